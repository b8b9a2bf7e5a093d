"""No silent wrong answers: every mistake below once gave a wrong result with exit status 0 and no word. Each is
now refused (or warned about) with a message naming the input and the fix, before any model is loaded where the
input alone decides. The last test walks the whole CLI with a wrong input at each step."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from convret.cli import main as cli

from _retrieval_fixtures import tiny_checkpoint, write_eval_world

REALDATA = Path(os.environ.get("CONVRET_REALDATA")
                or Path(__file__).resolve().parents[1].parent / "shared" / "realdata")
needs_realdata = pytest.mark.skipif(not (REALDATA / "SOURCES.md").is_file(), reason=f"{REALDATA} is absent")
ROOT = Path(__file__).resolve().parents[1]


def _err(capsys) -> str:
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny checkpoints A and B, an evaluation world, A's passage embeddings and index, A's and B's queries."""
    d = tmp_path_factory.mktemp("guards")
    a, b = tiny_checkpoint(d / "A", seed=0), tiny_checkpoint(d / "B", seed=1)
    write_eval_world(d / "w", n_conv=3, turns=3)
    for model, kind, source, out in ((a, "--collection", "collection.jsonl", "docsA"),
                                     (a, "--conversations", "eval.json", "qA"),
                                     (b, "--conversations", "eval.json", "qB")):
        assert cli(["encode", "--model", str(model), kind, str(d / "w" / source), "--output", str(d / out),
                    "--no-progress"]) == 0
    assert cli(["index", "--embeddings", str(d / "docsA"), "--output", str(d / "idxA"), "--no-progress"]) == 0
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is an error: what the test checks must be decided before."""
    from convret.retrieval.encoder import Encoder

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(Encoder, "from_checkpoint", classmethod(refuse))


@pytest.fixture
def no_server(monkeypatch):
    """`convret serve` gets through start-up but never listens."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)


# ------------------------------------------------------------------------------------ 1. one model's vectors
def test_search_refuses_queries_of_another_model_naming_both(world, tmp_path, capsys):
    argv = ["search", "--index", str(world / "idxA"), "--queries", str(world / "qB"), "--top_k", "5"]
    assert cli([*argv, "--output", str(tmp_path / "run.trec")]) == 1
    err = _err(capsys)
    assert str(world / "A") in err and str(world / "B") in err and "--allow-model-mismatch" in err
    assert not (tmp_path / "run.trec").exists()
    assert cli([*argv, "--output", str(tmp_path / "run.trec"), "--allow-model-mismatch"]) == 0
    assert "warning (--allow-model-mismatch)" in _err(capsys)
    assert cli(["search", "--index", str(world / "idxA"), "--queries", str(world / "qA"), "--top_k", "5",
                "--output", str(tmp_path / "same.trec")]) == 0


def test_serve_refuses_a_model_that_did_not_encode_the_index(world, capsys, no_server, monkeypatch):
    from convret.retrieval.encoder import Encoder

    argv = ["serve", "--index", str(world / "idxA"), "--collection", str(world / "w" / "collection.jsonl"),
            "--port", "0"]
    loaded = []
    original = Encoder.from_checkpoint.__func__
    monkeypatch.setattr(Encoder, "from_checkpoint",
                        classmethod(lambda cls, path, **k: loaded.append(path) or original(cls, path, **k)))
    assert cli([*argv, "--model", str(world / "B")]) == 2
    err = _err(capsys)
    assert str(world / "A") in err and str(world / "B") in err and "--allow-model-mismatch" in err
    assert loaded == []  # refused before the model was loaded
    assert cli([*argv, "--model", str(world / "B"), "--allow-model-mismatch"]) == 0
    assert cli([*argv, "--model", str(world / "A")]) == 0 and len(loaded) == 2


def test_a_copied_checkpoint_is_the_same_model_a_retrained_one_is_not(world, tmp_path):
    from convret.provenance import content_identity

    shutil.copytree(world / "A", tmp_path / "copy")
    assert content_identity(tmp_path / "copy") == content_identity(world / "A")
    tiny_checkpoint(tmp_path / "copy", seed=5)  # retrained at the same path
    assert content_identity(tmp_path / "copy") != content_identity(world / "A")


# ------------------------------------------------------------------------------------ 2. queries as passages
def test_index_refuses_query_embeddings(world, tmp_path, capsys):
    assert cli(["index", "--embeddings", str(world / "qA"), "--output", str(tmp_path / "idx")]) == 1
    err = _err(capsys)
    assert "holds query embeddings" in err and "convret encode --collection" in err
    assert not (tmp_path / "idx").exists()


# ------------------------------------------------------------------------------------ 3. existing outputs
def test_every_writing_command_has_overwrite_and_the_rule_is_documented_once():
    import importlib

    for module in ("encode", "index", "search", "metrics", "evaluate", "export", "generate", "mine"):
        parser = importlib.import_module(f"convret.retrieval.{module}").build_parser()
        assert "--overwrite" in parser._option_string_actions, module
    docs = (ROOT / "docs" / "retrieval.md").read_text(encoding="utf-8")
    assert docs.count("### Writing into an output that already exists") == 1
    for doc in ("train.md", "data.md", "serve.md"):
        assert "### Writing into an output" not in (ROOT / "docs" / doc).read_text(encoding="utf-8")


def test_index_replaces_its_own_output_and_refuses_another_models(world, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert cli(["index", "--embeddings", str(world / "docsA"), "--output", str(idx), "--no-progress"]) == 0
    assert cli(["index", "--embeddings", str(world / "docsA"), "--output", str(idx), "--no-progress"]) == 0
    assert cli(["encode", "--model", str(world / "B"), "--collection", str(world / "w" / "collection.jsonl"),
                "--output", str(tmp_path / "docsB"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["index", "--embeddings", str(tmp_path / "docsB"), "--output", str(idx), "--no-progress"]) == 1
    err = _err(capsys)
    assert "of another model, input or setting" in err and "checkpoint" in err and "--overwrite" in err
    assert cli(["index", "--embeddings", str(world / "docsA"), "--output", str(idx), "--factory", "SQ8",
                "--no-progress"]) == 1
    assert "factory: 'Flat' -> 'SQ8'" in _err(capsys)
    assert cli(["index", "--embeddings", str(tmp_path / "docsB"), "--output", str(idx), "--overwrite",
                "--no-progress"]) == 0
    # a directory convret did not write: refused, its file untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli(["index", "--embeddings", str(world / "docsA"), "--output", str(mine), "--no-progress"]) == 1
    assert "records nothing of what produced it" in _err(capsys) and (mine / "notes.txt").read_text() == "mine"


def test_encode_refuses_a_directory_that_is_not_an_embedding_directory(world, tmp_path, capsys):
    shutil.copytree(world / "idxA", tmp_path / "idx")
    before = sorted(p.name for p in (tmp_path / "idx").iterdir())  # a served index also holds its passage store
    assert cli(["encode", "--model", str(world / "A"), "--collection", str(world / "w" / "collection.jsonl"),
                "--output", str(tmp_path / "idx"), "--no-progress"]) == 1
    err = _err(capsys)
    listed = err.split("holds files that are not an embedding directory's (")[1].split(")")[0].split(", ")
    assert {"ids.txt", "index.faiss"} <= set(listed) and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == before


def test_search_eval_and_generate_never_replace_a_file_silently(world, tmp_path, capsys, no_model_load):
    run = tmp_path / "run.trec"
    run.write_text("my notes\n")
    assert cli(["search", "--index", str(world / "idxA"), "--queries", str(world / "qA"), "--output", str(run)]) == 1
    assert "--overwrite" in _err(capsys) and run.read_text() == "my notes\n"
    assert cli(["search", "--index", str(world / "idxA"), "--queries", str(world / "qA"), "--output", str(run),
                "--overwrite"]) == 0
    metrics = tmp_path / "m.json"
    qrels = world / "w" / "qrels.tsv"
    assert cli(["eval", "--qrels", str(qrels), "--run", str(run), "--json", str(metrics)]) == 0
    assert cli(["eval", "--qrels", str(qrels), "--run", str(run), "--json", str(metrics)]) == 0  # the same: again
    assert cli(["eval", "--qrels", str(qrels), "--run", str(run), "--json", str(metrics), "--rel_threshold",
                "2"]) == 1
    assert "rel_threshold: 1 -> 2" in _err(capsys)
    out = tmp_path / "gen.jsonl"
    out.write_text("{}\n")
    assert cli(["generate", "--model", str(world / "A"), "--conversations", str(world / "w" / "eval.json"),
                "--output", str(out)]) == 1
    assert "--overwrite" in _err(capsys) and out.read_text() == "{}\n"


def test_export_refuses_another_models_export(world, tmp_path, capsys):
    out = tmp_path / "st"
    assert cli(["export", str(world / "A"), str(out)]) == 0
    record = json.loads((out / "convret_export.json").read_text())
    assert cli(["export", str(world / "A"), str(out)]) == 0  # the same checkpoint: replaced
    capsys.readouterr()
    assert cli(["export", str(world / "B"), str(out)]) == 1
    err = _err(capsys)
    assert "checkpoint: " in err and "--overwrite" in err
    assert json.loads((out / "convret_export.json").read_text()) == record  # untouched


# ------------------------------------------------------------------------------------ 4. unjudged runs
@needs_realdata
def test_eval_names_the_cast_prefix_mix_up(tmp_path, capsys):
    qrels = REALDATA / "llm4cs" / "cast19_qrel.tsv"  # numeric ids, no MARCO_ / CAR_
    lines = [line.split() for line in qrels.read_text().splitlines()]
    run = tmp_path / "marco.trec"
    run.write_text("".join(f"{q} Q0 MARCO_{d} {i % 10 + 1} {10 - i % 10} x\n" for i, (q, _, d, _) in enumerate(lines)))
    assert cli(["eval", "--qrels", str(qrels), "--run", str(run)]) == 0
    err = _err(capsys)
    assert "none of the documents the run retrieved is judged" in err and "prefix MARCO_" in err
    assert "qrels' ids lack" in err and str(run) in err
    # the CAsT originals prefix their ids; a run of a collection without the prefixes
    qrels = REALDATA / "trec_cast" / "2019" / "2019qrels.txt"
    run.write_text("".join(f"{q} Q0 {d.split('_', 1)[1]} 1 1.0 x\n"
                           for q, _, d, _ in (line.split() for line in qrels.read_text().splitlines())))
    assert cli(["eval", "--qrels", str(qrels), "--run", str(run)]) == 0
    err = _err(capsys)
    assert "the qrels' ids carry the prefix" in err and "MARCO_" in err and "CAR_" in err
    # passage ids against document qrels: the fix is --doc-max-aggregate, after which nothing is said
    qrels, passages = (REALDATA / "trec_cast" / "2021" / "trec-cast-qrels-docs.2021.qrel",
                       REALDATA / "trec_cast" / "2021" / "org_convdr.trec")
    assert cli(["eval", "--qrels", str(qrels), "--run", str(passages)]) == 0
    assert "--doc-max-aggregate" in _err(capsys)
    assert cli(["eval", "--qrels", str(qrels), "--run", str(passages), "--doc-max-aggregate"]) == 0
    assert "warning" not in _err(capsys)


def test_judged_share_against_its_oracle():
    from convret.retrieval.metrics import judged_documents

    qrels = {"q1": {"a": 1, "b": 0, "c": 2}, "q2": {"d": 1}}
    run = {"q1": {"a": 1.0, "x": 0.5}, "q2": {"y": 1.0, "z": 0.9, "w": 0.1}, "q3": {"a": 1.0}}
    # judged: q1 a (1 of min(3, 2) = 2), q2 none (of min(1, 3) = 1); q3 has no qrels
    assert judged_documents(qrels, run) | {"warning": None} == {"judged": 1, "possible": 3, "share": 1 / 3,
                                                                "warning": None}
    assert judged_documents(qrels, {"q1": {"A": 1.0}})["warning"].endswith("(run e.g. 'A', qrels e.g. 'a')")


def test_evaluate_warns_when_the_collection_holds_no_judged_passage(world, tmp_path, capsys):
    collection = tmp_path / "prefixed.jsonl"
    collection.write_text("".join(json.dumps({**json.loads(line), "id": "MARCO_" + json.loads(line)["id"]}) + "\n"
                                  for line in (world / "w" / "collection.jsonl").read_text().splitlines()))
    assert cli(["evaluate", "--model", str(world / "A"), "--conversations", str(world / "w" / "eval.json"),
                "--collection", str(collection), "--qrels", str(world / "w" / "qrels.tsv"), "--output",
                str(tmp_path / "out"), "--top_k", "10"]) == 0
    err = _err(capsys)
    assert f"writing the runs, results.json and the embedding cache to {tmp_path / 'out'}" in err
    assert "warning: model" in err and "prefix MARCO_" in err


# ------------------------------------------------------------------------------------ 5-7. train
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`convret train` on the embedded tiny config for 2 steps (the bundled sample world), stderr kept."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("train")
    train_file = d / "train.jsonl"
    from convret.data import sample_world as sw

    shutil.copy(Path(sw.SAMPLE_WORLD_DIR) / sw.TRAIN_ULTRACHAT, train_file)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(["train", "--output_dir", str(d / "run"), *TRAIN_FLAGS]) == 0
    return d, err.getvalue()


TRAIN_FLAGS = ["--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
               "--max_examples", "16", "--disable_tqdm", "true"]


def test_train_says_what_it_trains_on_and_logs_it(trained):
    d, err = trained
    from convret.data import sample_world as sw

    assert "no train_file given: the bundled sample world" in err and sw.TRAIN_ULTRACHAT in err
    assert "(ultrachat): 16 examples, 16 with a positive passage" in err
    first = json.loads((d / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["data"] == [{"train_file": str(Path(sw.SAMPLE_WORLD_DIR) / sw.TRAIN_ULTRACHAT),
                              "format": "ultrachat", "examples": 16, "with_positive": 16, "skipped_records": 0,
                              "sample_world": True}]
    assert (d / "run" / "checkpoint-2" / "convret_resume.json").is_file()


def test_resume_with_other_data_or_settings_is_refused(trained, capsys, monkeypatch):
    d, _ = trained
    import convret.train.main as train_main

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the resume was checked")

    monkeypatch.setattr(train_main, "build_trainer", no_build)
    run = ["train", "--output_dir", str(d / "run"), *TRAIN_FLAGS[:1], "4", *TRAIN_FLAGS[2:]]
    assert cli([*run, "--max_session_len", "128"]) == 2
    err = _err(capsys)
    assert "cannot resume from" in err and "max_session_len: 96 -> 128" in err and "--resume_with_changes" in err
    assert cli([*run, "--train_file", str(d / "train.jsonl"), "--num_negatives", "2"]) == 2
    err = _err(capsys)
    assert "num_negatives: 1 -> 2" in err
    # the same content at another path: safe, and said so
    with pytest.raises(AssertionError, match="built before"):
        cli([*run, "--train_file", str(d / "train.jsonl")])
    assert "train_file_path changed" in _err(capsys)
    with pytest.raises(AssertionError, match="built before"):
        cli([*run, "--max_session_len", "128", "--resume_with_changes", "true"])
    assert "resuming with changes (--resume_with_changes): max_session_len: 96 -> 128" in _err(capsys)


@needs_realdata
def test_train_refuses_a_file_without_positives_before_building_the_model(tmp_path, capsys, monkeypatch):
    import convret.train.model as model_module

    monkeypatch.setattr(model_module, "build_model", lambda *a, **k: pytest.fail("model built"))
    qrecc = REALDATA / "qrecc" / "qrecc_test.first4.json"  # QReCC turns without Gold_passage
    assert cli(["train", "--train_file", str(qrecc), "--output_dir", str(tmp_path / "run"), *TRAIN_FLAGS]) == 2
    err = _err(capsys)
    assert str(qrecc) in err and "none of its 4 qrecc examples has a positive passage" in err


def test_flags_are_never_abbreviated_and_misspellings_get_a_suggestion(tmp_path, capsys):
    assert cli(["train", "--max_step", "2", "--output_dir", str(tmp_path / "run")]) == 2
    assert "unknown option --max_step (did you mean --max_steps?)" in _err(capsys)
    assert not (tmp_path / "run").exists()
    config = tmp_path / "c.yaml"
    config.write_text("max_step: 3\nlearnin_rate: 0.1\n")
    assert cli(["train", "--config", str(config)]) == 2
    err = _err(capsys)
    assert "unknown key 'max_step' (did you mean max_steps?)" in err and "did you mean learning_rate?" in err
    assert len(err) < 400  # a suggestion, not the two hundred valid names
    with pytest.raises(SystemExit) as exit_info:
        cli(["encode", "--colection", "c.jsonl", "--model", "m", "--output", "o"])
    assert exit_info.value.code == 2
    assert "unknown option --colection (did you mean --collection?)" in _err(capsys)
    with pytest.raises(SystemExit):
        cli(["search", "--top", "5", "--index", "i", "--queries", "q", "--output", "o"])
    assert "unknown option --top (did you mean --top_k?)" in _err(capsys)


def test_train_help_shows_resume_auto_and_config(capsys):
    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    resume = out[out.index("  --resume RESUME"):]
    assert "(default: auto)" in resume[: resume.index("--", 20)]
    assert "--config FILE.yaml" in out


# ------------------------------------------------------------------------------------ 8. data check, encode
def test_data_check_finds_repeated_passage_ids(tmp_path, capsys):
    collection = tmp_path / "c.jsonl"
    collection.write_text("".join(json.dumps({"id": i, "text": f"text {n}"}) + "\n"
                                  for n, i in enumerate(["a", "b", "a", "c", "b"])))
    assert cli(["data", "check", str(collection)]) == 1
    out = capsys.readouterr().out
    assert f"{collection}:3: duplicate passage id 'a' (first at line 1)" in out
    assert f"{collection}:5: duplicate passage id 'b' (first at line 2)" in out
    assert "3 records read, 2 skipped" in out


def test_a_failed_encode_leaves_no_empty_directory(world, tmp_path, capsys):
    collection = tmp_path / "dup.jsonl"
    collection.write_text('{"id": "a", "text": "w1 w2"}\n{"id": "a", "text": "w3"}\n')
    assert cli(["encode", "--model", str(world / "A"), "--collection", str(collection), "--output",
                str(tmp_path / "emb"), "--no-progress"]) == 1
    assert "duplicate passage id 'a'" in _err(capsys)
    assert not (tmp_path / "emb").exists()


def test_query_progress_bar_unit_and_file_level_errors(world, tmp_path, capsys):
    assert cli(["encode", "--model", str(world / "A"), "--conversations", str(world / "w" / "eval.json"),
                "--output", str(tmp_path / "q")]) == 0
    err = _err(capsys)
    assert "query/s" in err or "s/query" in err
    assert "querie/s" not in err and "s/querie " not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(["data", "check", str(empty)]) == 2
    err = _err(capsys)
    assert f"{empty}: empty file" in err and ":0:" not in err


# ------------------------------------------------------------------------------------ 9-10. formats, order
def test_every_command_checks_its_input_before_loading_a_model(world, tmp_path, capsys, no_model_load, no_server):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"foo": 1}\n')
    A, coll, conv = str(world / "A"), str(world / "w" / "collection.jsonl"), str(world / "w" / "eval.json")
    cases = [  # (argv, exit status, what the message must say)
        (["encode", "--model", A, "--collection", str(bad), "--output", str(tmp_path / "e")], 1,
         f"{bad}:1: cannot detect the format"),
        (["encode", "--model", A, "--collection", conv, "--output", str(tmp_path / "e")], 1,
         f"{conv}: a chatretriever-eval file, not a collection of passages"),
        (["evaluate", "--model", A, "--conversations", conv, "--collection", str(bad), "--qrels",
          str(world / "w" / "qrels.tsv"), "--output", str(tmp_path / "ev")], 1, f"{bad}:1: cannot detect"),
        (["generate", "--model", A, "--conversations", str(bad), "--output", str(tmp_path / "g.jsonl")], 1,
         f"{bad}:1: cannot detect"),
        (["serve", "--model", A, "--index", str(world / "idxA"), "--collection", str(bad)], 2,
         f"{bad}:1: cannot detect"),
        (["mine", "--train-file", str(bad), "--corpus", coll, "--retriever", A, "--output",
          str(tmp_path / "m.jsonl")], 1, f"{bad}:1: cannot detect"),
        (["mine", "--train-file", conv, "--corpus", coll, "--retriever", A, "--output", str(tmp_path / "m.jsonl")],
         1, f"{conv}: a chatretriever-eval file, not training data"),
    ]
    for argv, status, message in cases:
        assert cli(argv) == status, argv
        assert message in _err(capsys), argv
    assert not (tmp_path / "e").exists() and not (tmp_path / "ev").exists()


def test_generate_and_serve_take_a_format_where_detection_fails(world, tmp_path, capsys, no_server):
    # a collection as id<TAB>text<TAB>title without a header: no format is detected, `collection` reads it
    collection = tmp_path / "collection.tsv"
    collection.write_text("".join(f"{p['id']}\t{p['text']}\tsome title\n" for p in map(
        json.loads, (world / "w" / "collection.jsonl").read_text().splitlines())))
    argv = ["serve", "--model", str(world / "A"), "--index", str(world / "idxA"), "--collection", str(collection)]
    assert cli(argv) == 2
    assert "pass format=... (--format): tsv, collection, dpr-tsv can read its first records" in _err(capsys)
    assert cli([*argv, "--format", "collection"]) == 0
    from convret.retrieval.generate import build_parser

    args = build_parser().parse_args(["--model", "m", "--conversations", "c", "--output", "o", "--format", "cast",
                                      "--collection-format", "dpr-tsv"])
    assert (args.format, args.collection_format) == ("cast", "dpr-tsv")


# ------------------------------------------------------------------------------------ 11. smaller ones
def test_serve_accepts_roles_in_any_case():
    from convret.retrieval.session_encoder import turns_of
    from convret.serve.app import SearchIn

    request = SearchIn(turns=[{"role": "User", "text": "a"}, {"role": "ASSISTANT", "text": "b"},
                              {"role": "user", "text": "c"}])
    assert [t.role for t in request.turns] == ["user", "assistant", "user"]
    assert [t.role for t in turns_of([{"role": "User", "text": "a"}])] == ["user"]


def test_train_docs_name_the_model_config_of_tiny_yaml():
    import yaml

    config = yaml.safe_load((ROOT / "src/convret/resources/configs/tiny.yaml").read_text())["model_config"]
    row = next(line for line in (ROOT / "docs/train.md").read_text().splitlines() if line.startswith("| `tiny.yaml`"))
    assert config.removeprefix("resources:") in row and "tiny-qwen2.json" not in row


# ------------------------------------------------------------------------------------ the mine work directory
@pytest.fixture(scope="module")
def mine_inputs(tmp_path_factory):
    """A Tevatron training file of 12 queries and a corpus of their positives and 150 other passages."""
    from convret.data import sample_world as sw

    d = tmp_path_factory.mktemp("mine")
    base = Path(sw.SAMPLE_WORLD_DIR)
    lines = (base / sw.TRAIN_ADHOC).read_text().splitlines()[:12]
    wanted = {p["docid"] for line in lines for p in json.loads(line)["positive_passages"]}
    corpus = [line for n, line in enumerate((base / sw.COLLECTION).read_text().splitlines())
              if n < 150 or json.loads(line)["id"] in wanted]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    return d


def _mine(inputs, out, *extra, retriever="bm25"):
    return cli(["mine", "--train-file", str(inputs / "train.jsonl"), "--corpus", str(inputs / "corpus.jsonl"),
                "--retriever", str(retriever), "--output", str(out), "--window", "2-8", "--num-negatives", "2",
                "--no-progress", *extra])


def test_mine_never_deletes_a_users_files(mine_inputs, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert _mine(mine_inputs, tmp_path / "out.jsonl", "--work-dir", str(work)) == 1
    err = _err(capsys)
    assert "holds files mine did not write (notes.txt)" in err and "--work-dir" in err
    assert (work / "notes.txt").read_text() == "mine"
    # mine's own work directory, with a user's file dropped into it: mine deletes only what it wrote
    own = tmp_path / "own"
    assert _mine(mine_inputs, tmp_path / "out.jsonl", "--work-dir", str(own), "--keep-work") == 0
    (own / "notes.txt").write_text("mine")
    assert _mine(mine_inputs, tmp_path / "out.jsonl", "--work-dir", str(own), "--restart", "--overwrite") == 0
    assert sorted(p.name for p in own.iterdir()) == ["notes.txt"]
    # and without a user's file the work directory goes with the rest
    assert _mine(mine_inputs, tmp_path / "out2.jsonl") == 0
    assert not (tmp_path / "out2.jsonl.work").exists()


def test_mine_refuses_the_stale_work_of_a_retrained_checkpoint(mine_inputs, tmp_path, capsys):
    from convret.data import read_training

    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=0)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert _mine(mine_inputs, first, "--keep-work", "--shard-size", "64", retriever=ckpt) == 0
    tiny_checkpoint(ckpt, seed=7)  # retrained at the same path
    work = ["--work-dir", str(first) + ".work", "--shard-size", "64"]
    assert _mine(mine_inputs, second, *work, retriever=ckpt) == 1
    err = _err(capsys)
    assert "retriever_identity" in err and "--restart" in err
    # the corpus embeddings of the old model left without mine's state: the advice is mine's, not encode's
    (Path(str(first) + ".work") / "state.json").unlink()
    shutil.rmtree(Path(str(first) + ".work") / "index")
    assert _mine(mine_inputs, second, *work, retriever=ckpt) == 1
    err = _err(capsys)
    assert "another encoding" in err and "--restart" in err and "--overwrite" not in err
    assert _mine(mine_inputs, second, *work, "--restart", retriever=ckpt) == 0
    fresh = tmp_path / "fresh.jsonl"
    assert _mine(mine_inputs, fresh, "--shard-size", "64", retriever=ckpt) == 0  # the oracle: no work at all
    assert second.read_bytes() == fresh.read_bytes()
    assert [e.negatives for e in read_training(second)] != [e.negatives for e in read_training(first)]


# ------------------------------------------------------------------------------------ the walk
def test_the_pipeline_walk_refuses_or_warns_at_every_wrong_step(mine_inputs, tmp_path, capsys, no_server):
    """data check -> mine -> train -> encode -> index -> search -> eval / evaluate -> export -> serve, each step
    first given a wrong input (refused or warned, the message naming the input and the fix), then the right one."""
    from convret.data import sample_world as sw

    started = time.perf_counter()
    base, d = Path(sw.SAMPLE_WORLD_DIR), tmp_path

    def refused(argv, status, *needles):
        got = cli(argv)
        err = _err(capsys)
        assert got == status, (argv, err)
        for needle in needles:
            assert needle in err, (argv, needle, err)

    # data check: a collection with a repeated id
    dup = d / "dup.jsonl"
    dup.write_text((mine_inputs / "corpus.jsonl").read_text().splitlines()[0] + "\n"
                   + (mine_inputs / "corpus.jsonl").read_text())
    assert cli(["data", "check", str(dup)]) == 1
    assert "duplicate passage id" in capsys.readouterr().out
    # mine: a work directory holding the user's files
    (d / "mine-work").mkdir()
    (d / "mine-work" / "keep.txt").write_text("x")
    refused(["mine", "--train-file", str(mine_inputs / "train.jsonl"), "--corpus", str(mine_inputs / "corpus.jsonl"),
             "--retriever", "bm25", "--output", str(d / "mined.jsonl"), "--work-dir", str(d / "mine-work")], 1,
            str(d / "mine-work"), "give mine a directory of its own")
    assert cli(["mine", "--train-file", str(mine_inputs / "train.jsonl"), "--corpus", str(mine_inputs / "corpus.jsonl"),
                "--retriever", "bm25", "--output", str(d / "mined.jsonl"), "--window", "2-8", "--no-progress"]) == 0
    # train: a misspelled flag, then a file without positives, then the mined file
    run = d / "run"
    refused(["train", "--max_step", "2", "--output_dir", str(run)], 2, "--max_step", "did you mean --max_steps")
    no_positive = d / "no_positive.jsonl"  # QReCC-style turns without Gold_passage
    no_positive.write_text("".join(json.dumps({"Conversation_no": 1, "Turn_no": i, "Question": "where is it",
                                               "Answer": "there", "Context": []}) + "\n" for i in range(1, 4)))
    refused(["train", "--train_file", str(no_positive), "--output_dir", str(run), *TRAIN_FLAGS], 2, str(no_positive),
            "none of its 3 qrecc examples has a positive passage", "Give a file with positives")
    assert cli(["train", "--train_file", str(d / "mined.jsonl"), "--output_dir", str(run), *TRAIN_FLAGS]) == 0
    model, init = run / "final", run / "init"
    # encode: a misspelled flag; then passages, queries; queries into the passages' directory
    with pytest.raises(SystemExit):
        cli(["encode", "--model", str(model), "--colection", str(mine_inputs / "corpus.jsonl"), "--output", "x"])
    assert "unknown option --colection (did you mean --collection?)" in _err(capsys)
    qrels = d / "qrels.tsv"
    turns = json.loads((base / sw.EVAL).read_text())[:3]
    (d / "eval.json").write_text(json.dumps(turns))
    qids = {f"{c['conv_id']}_{t['turn_id']}" for c in turns for t in c["turns"]}
    qrel_lines = [line for line in (base / sw.QRELS).read_text().splitlines() if line.split()[0] in qids]
    qrels.write_text("\n".join(qrel_lines) + "\n")
    judged = {line.split()[2] for line in qrel_lines}
    collection = d / "collection.jsonl"
    collection.write_text("".join(line + "\n" for n, line in enumerate((base / sw.COLLECTION).read_text().splitlines())
                                  if n < 100 or json.loads(line)["id"] in judged))
    for kind, source, out in (("--collection", collection, "docs"), ("--conversations", d / "eval.json", "queries")):
        assert cli(["encode", "--model", str(model), kind, str(source), "--output", str(d / out), "--no-progress"]) == 0
    refused(["encode", "--model", str(model), "--conversations", str(d / "eval.json"), "--output", str(d / "docs"),
             "--no-progress"], 1, str(d / "docs"), "kind: 'passages' -> 'queries'", "--overwrite")
    # index: the query embeddings; then the passages
    refused(["index", "--embeddings", str(d / "queries"), "--output", str(d / "index")], 1, str(d / "queries"),
            "holds query embeddings", "convret encode --collection")
    assert cli(["index", "--embeddings", str(d / "docs"), "--output", str(d / "index"), "--no-progress"]) == 0
    # search: queries of the untrained model against the trained model's index
    assert cli(["encode", "--model", str(init), "--conversations", str(d / "eval.json"), "--output",
                str(d / "init-queries"), "--no-progress"]) == 0
    refused(["search", "--index", str(d / "index"), "--queries", str(d / "init-queries"), "--output",
             str(d / "run.trec")], 1, str(init), str(model), "--allow-model-mismatch")
    assert cli(["search", "--index", str(d / "index"), "--queries", str(d / "queries"), "--top_k", "50",
                "--output", str(d / "run.trec")]) == 0
    # eval: qrels with CAsT's prefix the collection lacks
    prefixed = d / "qrels-prefixed.tsv"
    prefixed.write_text("".join(f"{q} 0 MARCO_{doc} {rel}\n" for q, _, doc, rel in map(str.split, qrel_lines)))
    refused(["eval", "--qrels", str(prefixed), "--run", str(d / "run.trec")], 0, str(d / "run.trec"),
            "the qrels' ids carry the prefix MARCO_")
    assert cli(["eval", "--qrels", str(qrels), "--run", str(d / "run.trec")]) == 0
    assert "warning" not in _err(capsys)
    # evaluate: the same mix-up, through the whole chain
    refused(["evaluate", "--model", str(model), "--conversations", str(d / "eval.json"), "--collection",
             str(collection), "--qrels", str(prefixed), "--output", str(d / "eval-out"), "--top_k", "50"], 0,
            "warning: model", "MARCO_")
    # export: into the index directory (another command's output)
    refused(["export", str(model), str(d / "index")], 1, str(d / "index"), "--overwrite")
    # serve: the untrained model over the trained model's index, refused before it is loaded
    refused(["serve", "--model", str(init), "--index", str(d / "index"), "--collection", str(collection)], 2,
            str(init), str(model), "--allow-model-mismatch")
    assert cli(["serve", "--model", str(model), "--index", str(d / "index"), "--collection", str(collection)]) == 0
    print(f"pipeline walk: {time.perf_counter() - started:.1f} s")
