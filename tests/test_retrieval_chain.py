"""convret evaluate: the whole chain equals encode -> index -> search -> eval run step by step."""
import json

import pytest

from convret.retrieval.encode import main as encode_main
from convret.retrieval.evaluate import evaluate_chain, main as evaluate_main
from convret.retrieval.index import main as index_main
from convret.retrieval.metrics import main as eval_main
from convret.retrieval.search import main as search_main

from _retrieval_fixtures import tiny_checkpoint, write_eval_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_eval_world(root)
    write_eval_world(root, shuffle_context=1)
    write_eval_world(root, shuffle_context=2)
    return root, tiny_checkpoint(root / "model", seed=0), tiny_checkpoint(root / "init", seed=7)


def test_chain_equals_the_step_by_step_commands(world, tmp_path, capsys):
    root, model, init = world
    steps = tmp_path / "steps"
    assert encode_main(["--model", str(model), "--collection", str(root / "collection.jsonl"), "--output",
                        str(steps / "docs"), "--no-progress"]) == 0
    assert encode_main(["--model", str(model), "--conversations", str(root / "eval.json"), "--output",
                        str(steps / "queries"), "--no-progress"]) == 0
    assert index_main(["--embeddings", str(steps / "docs"), "--output", str(steps / "index")]) == 0
    assert search_main(["--index", str(steps / "index"), "--queries", str(steps / "queries"), "--top_k", "100",
                        "--output", str(steps / "run.trec")]) == 0
    assert eval_main(["--qrels", str(root / "qrels.tsv"), "--run", str(steps / "run.trec"), "--json",
                      str(steps / "m.json")]) == 0
    expected = json.loads((steps / "m.json").read_text())["measures"]

    out = tmp_path / "chain"
    argv = ["--model", str(model), "--conversations", str(root / "eval.json"), "--collection",
            str(root / "collection.jsonl"), "--qrels", str(root / "qrels.tsv"), "--baseline", str(init),
            "--query-only", "--rewrite", "--top_k", "100", "--output", str(out), "--contexts",
            str(root / "eval_context_1.json"), str(root / "eval_context_2.json")]
    capsys.readouterr()
    assert evaluate_main(argv) == 0
    table = capsys.readouterr().out
    assert "| model |" in table and "| baseline init |" in table and "current utterance only" in table
    assert "Robustness: NDCG@3 over 2 alternative contexts" in table
    result = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["model", "model, current utterance only", "model, manual rewrite", "baseline init"]
    for key, value in expected.items():
        assert result["rows"][0]["measures"][key] == pytest.approx(value, abs=1e-9), key
    assert result["rows"][1]["measures"] != result["rows"][0]["measures"]
    assert len(result["robustness"]["ndcg_cut_3"]) == 2
    # the collection is encoded once per model and reused
    caches = sorted(p.name for p in (out / "cache").iterdir())
    assert len(caches) == 2
    mtimes = [p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npy")]
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "00-model.trec", "01-model_current_utterance_only.trec", "02-model_manual_rewrite.trec",
        "03-baseline_init.trec"]  # no commas or spaces in the names
    fewer = argv[:8] + ["--output", str(out), "--top_k", "100", "--contexts"]
    capsys.readouterr()
    assert evaluate_main(fewer) == 1  # other settings than the results there: refused, nothing replaced
    assert "--overwrite" in capsys.readouterr().err and len(json.loads((out / "results.json").read_text())["rows"]) == 4
    assert evaluate_main(fewer + ["--overwrite"]) == 0
    assert [p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npy")] == mtimes
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["00-model.trec"]  # the earlier runs went with them


def test_chain_rejects_qrels_for_unknown_queries(world, tmp_path):
    root, model, _ = world
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text((root / "qrels.tsv").read_text() + "99_1 0 g0_1 1\n")
    with pytest.raises(ValueError, match="qrels for 1 queries"):
        evaluate_chain(str(model), str(root / "eval.json"), str(root / "collection.jsonl"), str(qrels),
                       tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()
