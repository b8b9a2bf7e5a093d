"""convret evaluate: the whole chain against a numpy brute force and pytrec_eval, and against encode -> index ->
search -> eval run step by step."""
import json

import numpy as np
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


def _brute_force(model, root, top_k):
    """The oracle run: a numpy float64 brute force over the checkpoint's own embeddings (Encoder.encode_passages /
    encode_sessions in this process: no embedding directory, faiss index or search_index), score descending, ties
    by docid; ``{qid: [(docid, score), ...]}``."""
    from convret.data import read_collection, read_conversations
    from convret.retrieval.encoder import Encoder

    encoder = Encoder.from_checkpoint(model)
    passages = list(read_collection(root / "collection.jsonl"))
    turns = list(read_conversations(root / "eval.json"))
    P = encoder.encode_passages(passages).astype(np.float64)
    Q = encoder.encode_sessions([(t.history, t.query) for t in turns]).astype(np.float64)
    ids = np.asarray([p.id for p in passages])
    run = {}
    for turn, q in zip(turns, Q):
        scores = P @ q
        order = np.lexsort((ids, -scores))[:top_k]
        gaps = -np.diff(scores[order])
        assert gaps.min() > 1e-6, "near-ties: float32 search and the float64 oracle may order them differently"
        run[turn.qid] = [(str(ids[j]), float(scores[j])) for j in order]
    return run


def test_chain_equals_the_step_by_step_commands(world, tmp_path, capsys):
    """Two checks of different kinds. (1) The oracle: the chain's run is a numpy brute force's ranking over the
    checkpoint's own embeddings, and its measures are pytrec_eval's, called here on that run. (2) The step-by-step
    commands (encode, index, search, eval) run the same code as the chain: their agreement guards the chain's
    composition (the collection encoded once and cached per model, the same arguments reaching each step, the
    rows it adds), not the steps themselves."""
    import pytrec_eval

    from convret.data import read_qrels, read_run

    root, model, init = world
    steps = tmp_path / "steps"
    assert encode_main(["--model", str(model), "--collection", str(root / "collection.jsonl"), "--output",
                        str(steps / "docs"), "--no-progress"]) == 0
    assert encode_main(["--model", str(model), "--conversations", str(root / "eval.json"), "--output",
                        str(steps / "queries"), "--no-progress"]) == 0
    assert index_main(["--embeddings", str(steps / "docs"), "--output", str(steps / "index")]) == 0
    assert search_main(["--index", str(steps / "index"), "--queries", str(steps / "queries"), "--top_k", "10",
                        "--output", str(steps / "run.trec")]) == 0
    assert eval_main(["--qrels", str(root / "qrels.tsv"), "--run", str(steps / "run.trec"), "--json",
                      str(steps / "m.json")]) == 0
    expected = json.loads((steps / "m.json").read_text())["measures"]

    out = tmp_path / "chain"
    argv = ["--model", str(model), "--conversations", str(root / "eval.json"), "--collection",
            str(root / "collection.jsonl"), "--qrels", str(root / "qrels.tsv"), "--baseline", str(init),
            "--query-only", "--rewrite", "--top_k", "10", "--output", str(out), "--contexts",
            str(root / "eval_context_1.json"), str(root / "eval_context_2.json")]
    capsys.readouterr()
    assert evaluate_main(argv) == 0
    table = capsys.readouterr().out
    assert "| model |" in table and "| baseline init |" in table and "current utterance only" in table
    assert "Robustness: NDCG@3 over 2 alternative contexts" in table
    result = json.loads((out / "results.json").read_text())
    # (1) the oracle
    oracle = _brute_force(model, root, 10)  # of 32 passages: the cut matters
    chain_run = read_run(result["rows"][0]["run"], strict=True)
    assert set(chain_run) == set(oracle)
    for qid, ranked in oracle.items():
        got = sorted(chain_run[qid].items(), key=lambda x: (-x[1], x[0]))
        assert [d for d, _ in got] == [d for d, _ in ranked], qid
        np.testing.assert_allclose([s for _, s in got], [s for _, s in ranked], rtol=0, atol=1e-5)
    qrels = read_qrels(root / "qrels.tsv")
    assert all(max(docs.values()) >= 1 for docs in qrels.values()) and set(qrels) <= set(oracle)
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.3,10", "map", "recall.10"}).evaluate(
        {q: dict(docs) for q, docs in oracle.items() if q in qrels})
    for key in ("ndcg_cut_3", "ndcg_cut_10", "map", "recall_10"):
        assert result["rows"][0]["measures"][key] == pytest.approx(np.mean([v[key] for v in per_query.values()]),
                                                                   abs=1e-9), key
    # (2) the composition
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
