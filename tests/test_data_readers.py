"""Readers of every supported format: fixtures in the exact formats, bad records, `convret data check`."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from convret.cli import main as cli_main
from convret.data import (ASSISTANT, MAX_REPORTED_ERRORS, USER, DataError, Passage, ReadReport, detect_format,
                          read_collection, read_conversations, read_qrels, read_run, read_training, write_qrels,
                          write_run)
from convret.data.readers import _iter_json_array

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize("name, fmt", [
    ("ultrachat.jsonl", "ultrachat"), ("tevatron_legacy.jsonl", "tevatron"), ("tevatron_new.jsonl", "tevatron"),
    ("chatretriever_eval.json", "chatretriever-eval"), ("qrecc.json", "qrecc"), ("topiocqa.json", "topiocqa"),
    ("cast.json", "cast"), ("collection.jsonl", "collection"), ("tevatron_corpus.jsonl", "collection"),
    ("collection.tsv", "tsv"), ("qrels.txt", "qrels"), ("run.trec", "run"),
])
def test_detect_format(name, fmt):
    assert detect_format(FIX / name) == fmt


def test_ultrachat_one_example_per_user_turn():
    report = ReadReport()
    examples = list(read_training(FIX / "ultrachat.jsonl", report=report))
    assert (report.records, report.skipped, report.items) == (3, 0, 6)
    assert [e.id for e in examples] == ["uc-101_1", "uc-101_2", "uc-102_1", "uc-102_2", "uc-102_3", "uc-103_1"]
    second = examples[1]
    assert second.query == "How long does it take to climb it?"
    assert [t.role for t in second.history] == [USER, ASSISTANT]
    assert second.history[1].text.startswith("Mount Kilimanjaro")
    assert second.positive.text.startswith("Most climbers") and second.response == second.positive.text
    assert second.positive.id == "uc-101_2_pos"
    assert [n.text[:8] for n in second.negatives] == ["Climbing"]
    assert second.rewrite == "How long does it take to climb Mount Kilimanjaro?"
    assert len(examples[5].negatives) == 3 and len(examples[2].negatives) == 0
    assert len(examples[4].history) == 4


def test_tevatron_both_schemas_agree():
    legacy = list(read_training(FIX / "tevatron_legacy.jsonl"))
    assert [e.id for e in legacy] == ["q1", "q2", "q3"]
    assert legacy[0].positive == Passage("d11", legacy[0].positive.text, "Aurora")
    assert [n.id for n in legacy[0].negatives] == ["d12", "d13"] and legacy[2].negatives == []
    assert legacy[0].history == [] and legacy[0].response is None
    for corpus in (FIX / "tevatron_corpus.jsonl", {p.id: p for p in read_collection(FIX / "tevatron_corpus.jsonl")}):
        new = list(read_training(FIX / "tevatron_new.jsonl", corpus=corpus))
        assert [(e.id, e.query, e.positive, e.negatives) for e in new] == \
               [(e.id, e.query, e.positive, e.negatives) for e in legacy[:2]]


def test_tevatron_new_docid_missing_from_corpus(tmp_path):
    corpus = {"d11": Passage("d11", "aurora text")}
    report = ReadReport()
    assert list(read_training(FIX / "tevatron_new.jsonl", corpus=corpus, report=report)) == []
    assert report.skipped == 2 and "'d12' is not in the corpus" in report.errors[0][1]


def test_triplets_from_topiocqa_and_qrecc():
    topio = list(read_training(FIX / "topiocqa.json"))
    assert [e.id for e in topio] == ["1_1", "1_2"]
    assert topio[1].positive.id == "wiki:5498209" and topio[1].response.startswith("No, it was fought")
    assert topio[1].positive.text != topio[1].response
    assert [t.role for t in topio[1].history] == [USER, ASSISTANT]
    qrecc = list(read_training(FIX / "qrecc.json"))
    assert qrecc[1].positive is None and qrecc[1].response.startswith("Cherone also")  # LM-only: no gold passage
    assert qrecc[1].rewrite.startswith("Did Gary Cherone")


def test_conversations_of_each_eval_format():
    cr = list(read_conversations(FIX / "chatretriever_eval.json"))
    assert [t.qid for t in cr] == ["31_1", "31_2", "31_3", "32_1", "32_2"]
    assert cr[2].query == "What about lung cancer?" and cr[2].rewrite == "Is lung cancer treatable?"
    assert [t.text[:6] for t in cr[2].history] == ["What i", "Throat", "Is it ", "Yes: e"]
    assert len(cr[0].positive_texts) == 1 and len(cr[3].positive_texts) == 1 and cr[4].history[0].role == USER

    qrecc = list(read_conversations(FIX / "qrecc.json"))
    assert [t.qid for t in qrecc] == ["1_1", "1_2", "2_1"]
    assert qrecc[1].history[0].text == qrecc[0].query and qrecc[1].response.startswith("Cherone")

    topio = list(read_conversations(FIX / "topiocqa.json"))
    assert topio[0].positive_texts[0].startswith("The Australian contribution")

    cast = list(read_conversations(FIX / "cast.json"))
    assert [t.qid for t in cast] == ["31_1", "31_2", "31_3", "106_1", "106_2"]
    assert cast[1].rewrite == "Is throat cancer treatable?" and [t.role for t in cast[2].history] == [USER, USER]
    assert [t.role for t in cast[4].history] == [USER, ASSISTANT]  # CAsT 2021+ canonical response passage


def test_collections_all_three_layouts():
    jsonl = list(read_collection(FIX / "collection.jsonl"))
    assert jsonl[0] == Passage("d11", jsonl[0].text, "Aurora") and jsonl[1].title == ""
    tevatron = list(read_collection(FIX / "tevatron_corpus.jsonl"))
    assert [p.id for p in tevatron] == ["d11", "d12", "d13", "d21", "d22"]
    tsv = list(read_collection(FIX / "collection.tsv"))
    assert [p.id for p in tsv] == ["0", "1", "2"] and tsv[1].text.startswith("The Manhattan Project and")


def test_qrels_and_run_match_pytrec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    with open(FIX / "qrels.txt") as f:
        assert read_qrels(FIX / "qrels.txt") == pytrec_eval.parse_qrel(f)
    with open(FIX / "run.trec") as f:
        assert read_run(FIX / "run.trec") == pytrec_eval.parse_run(f)


def test_write_run_sorts_ranks_from_one_and_round_trips(tmp_path):
    rng = random.Random(3)
    results = {f"c{q}_{t}": [(f"doc{d}", rng.uniform(-1, 1)) for d in rng.sample(range(100), 7)]
               for q in range(3) for t in range(1, 3)}
    write_run(tmp_path / "run.trec", results, tag="convret")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == 6 * 7
    by_query: dict[str, list[list[str]]] = {}
    for line in lines:
        cols = line.split()
        assert cols[1] == "Q0" and cols[5] == "convret"
        by_query.setdefault(cols[0], []).append(cols)
    for qid, rows in by_query.items():
        assert [int(r[3]) for r in rows] == list(range(1, 8))
        scores = [float(r[4]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert sorted(scores) == sorted(s for _, s in results[qid])  # exact: repr round-trips
    assert read_run(tmp_path / "run.trec") == {q: dict(p) for q, p in results.items()}
    with pytest.raises(ValueError, match="whitespace"):
        write_run(tmp_path / "bad.trec", {"a b": [("d", 1.0)]}, tag="x")
    assert not (tmp_path / "bad.trec").exists()  # atomic: nothing half-written


def test_write_qrels_round_trips(tmp_path):
    qrels = {"1_1": {"p3": 2, "p9": 1}, "1_2": {"p3": 0}}
    write_qrels(tmp_path / "q.tsv", qrels)
    assert read_qrels(tmp_path / "q.tsv") == qrels
    assert (tmp_path / "q.tsv").read_text().splitlines()[0] == "1_1 0 p3 2"


# ------------------------------------------------------------------------------------------ bad records
GOOD_CONV = {"conv_id": "c", "conversation": [{"role": "User", "text": "hi there"},
                                             {"role": "Assistant", "text": "hello"}]}


def _conv(**turn_overrides) -> dict:
    conv = json.loads(json.dumps(GOOD_CONV))
    conv["conversation"][0].update(turn_overrides)
    return conv


BAD_ULTRACHAT = {
    "bad JSON": ('{"conv_id": "c", "conversation": [', "invalid JSON"),
    "missing field": (json.dumps({"conv_id": "c"}), "missing field 'conversation'"),
    "missing turn text": (json.dumps({"conv_id": "c", "conversation": [{"role": "User"}, GOOD_CONV["conversation"][1]]}),
                          "missing field 'text' in conversation[0]"),
    "wrong type": (json.dumps(_conv(text=17)), "field 'text' in conversation[0] must be str, got int"),
    "wrong container type": (json.dumps({"conv_id": "c", "conversation": "hi"}), "must be list"),
    "empty text": (json.dumps(_conv(text="   ")), "empty text in field 'text' of conversation[0]"),
    "empty negative": (json.dumps({"conv_id": "c", "conversation": [
        GOOD_CONV["conversation"][0], {"role": "Assistant", "text": "x", "neg_texts": [""]}]}), "empty text"),
    "user turn alone": (json.dumps({"conv_id": "c", "conversation": [{"role": "User", "text": "and then?"}]}),
                        "no User turn followed by an Assistant turn"),
    "two user turns in a row": (json.dumps({"conv_id": "c", "conversation": [
        {"role": "User", "text": "a"}, *GOOD_CONV["conversation"]]}), "User turn 1 (conversation[0]) has no following"),
    "unknown role": (json.dumps(_conv(role="System")), "unknown role 'System'"),
    "not an object": ("[1, 2]", "must be a JSON object"),
}


@pytest.mark.parametrize("kind", list(BAD_ULTRACHAT))
def test_each_kind_of_bad_record_is_reported_skipped_counted(tmp_path, kind, caplog):
    bad, reason = BAD_ULTRACHAT[kind]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(GOOD_CONV), bad, json.dumps(GOOD_CONV)]) + "\n")
    report = ReadReport()
    with caplog.at_level("WARNING", logger="convret.data"):
        examples = list(read_training(path, format="ultrachat", report=report))
    assert len(examples) == 2 and (report.records, report.skipped) == (2, 1)
    assert report.errors[0][0] == 2 and reason in report.errors[0][1], report.errors
    assert f"{path}:2: " in caplog.text and "1 skipped" in caplog.text  # reported, and the summary at the end
    with pytest.raises(DataError) as info:
        list(read_training(path, format="ultrachat", strict=True))
    assert info.value.line == 2 and info.value.path == str(path) and reason in info.value.reason
    assert str(info.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("name, record, reason", [
    ("chatretriever-eval", {"conv_id": "1", "turns": [{"turn_id": 1, "question": ""}]}, "empty text"),
    ("chatretriever-eval", {"conv_id": "1", "turns": [{"turn_id": 1}]}, "missing field 'question'"),
    ("qrecc", {"Conversation_no": 1, "Turn_no": 1, "Question": "q", "Context": "not a list"}, "must be list"),
    ("topiocqa", {"Conversation_no": 1, "Question": "q", "Gold_passage": {}}, "missing field 'Turn_no'"),
    ("cast", {"number": 1, "turn": [{"number": 1, "raw_utterance": 3}]}, "must be str"),
])
def test_bad_eval_records(tmp_path, name, record, reason):
    good = {"chatretriever-eval": {"conv_id": "2", "turns": [{"turn_id": 1, "question": "ok?"}]},
            "qrecc": {"Conversation_no": 2, "Turn_no": 1, "Question": "ok?", "Context": []},
            "topiocqa": {"Conversation_no": 2, "Turn_no": 1, "Question": "ok?", "Context": []},
            "cast": {"number": 2, "turn": [{"number": 1, "raw_utterance": "ok?"}]}}[name]
    path = tmp_path / "eval.json"
    path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(record) + "\n]\n")
    report = ReadReport()
    turns = list(read_conversations(path, format=name, report=report))
    assert len(turns) == 1 and report.skipped == 1 and report.errors[0][0] == 3 and reason in report.errors[0][1]


def test_bad_collection_qrels_run_lines(tmp_path):
    (tmp_path / "c.tsv").write_text("1\tgood text\n2\t  \n3 no tab\n4\tfine\n")
    report = ReadReport()
    assert [p.id for p in read_collection(tmp_path / "c.tsv", format="collection", report=report)] == ["1", "4"]
    assert [line for line, _ in report.errors] == [2, 3]
    (tmp_path / "q.txt").write_text("1 0 d1 1\n1 0 d2 high\n1 0 d3\n1 0 d1 2\n")
    report = ReadReport()
    assert read_qrels(tmp_path / "q.txt", report=report) == {"1": {"d1": 1}}
    assert [line for line, _ in report.errors] == [2, 3, 4]
    (tmp_path / "r.trec").write_text("1 Q0 d1 1 2.5 t\n1 Q0 d2 x 2.0 t\n1 Q0 d3 3 nan t\n")
    report = ReadReport()
    assert read_run(tmp_path / "r.trec", report=report) == {"1": {"d1": 2.5}}
    assert report.skipped == 2


def test_json_array_streams_across_chunks_with_exact_lines(tmp_path):
    records = [{"conv_id": str(i), "turns": [{"turn_id": 1, "question": "x" * (i * 7 % 50 + 1)}]} for i in range(40)]
    text = "[\n" + ",\n".join(json.dumps(r, indent=1) for r in records) + "\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text)
    got = list(_iter_json_array(path, chunk_size=16))
    assert [obj for _, obj in got] == records
    starts = [line for line, _ in got]
    expected, line = [], 2
    for r in records:
        expected.append(line)
        line += json.dumps(r, indent=1).count("\n") + 1
    assert starts == expected
    # a syntax error inside an array: reported at its line, the rest cannot be read
    path.write_text(text.replace('"question": "xxxxxxxxxxxxxxx"', '"question": xx', 1))
    report = ReadReport()
    turns = list(read_conversations(path, format="chatretriever-eval", report=report))
    assert report.skipped == 1 and len(turns) == report.records < 40 and "invalid JSON" in report.errors[0][1]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_training(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty file"):
        detect_format(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="holds no conversations"):
        read_conversations(FIX / "ultrachat.jsonl")


# ------------------------------------------------------------------------------------------ data check
def test_data_check_json_counts_planted_bad_lines_exactly(tmp_path, capsys):
    rng = random.Random(11)
    kinds = [bad for bad, _ in BAD_ULTRACHAT.values()]
    lines, bad_lines = [], []
    for number in range(1, 801):
        if rng.random() < 0.2:
            lines.append(rng.choice(kinds))
            bad_lines.append(number)
        else:
            conv = {"conv_id": f"c{number}", "conversation": [
                {"role": "User", "text": f"question {number}"}, {"role": "Assistant", "text": "answer"}] *
                rng.randint(1, 3)}
            lines.append(json.dumps(conv))
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert len(bad_lines) > MAX_REPORTED_ERRORS  # the cap is exercised

    assert cli_main(["data", "check", str(path), "--json"]) == 1
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) == {"format", "records", "skipped", "errors"}
    assert result["format"] == "ultrachat"
    assert result["records"] == 800 - len(bad_lines) and result["skipped"] == len(bad_lines)
    assert len(result["errors"]) == MAX_REPORTED_ERRORS
    assert [e["line"] for e in result["errors"]] == bad_lines[:MAX_REPORTED_ERRORS]

    assert cli_main(["data", "check", str(path), "--json", "--strict"]) == 1
    strict = json.loads(capsys.readouterr().out)
    assert strict["records"] == bad_lines[0] - 1 and strict["errors"][0]["line"] == bad_lines[0]


def test_data_check_text_output_and_exit_codes(tmp_path, capsys):
    assert cli_main(["data", "check", str(FIX / "cast.json")]) == 0
    assert "cast: 2 records read, 0 skipped" in capsys.readouterr().out
    assert cli_main(["data", "check", str(FIX / "qrels.txt"), "--format", "qrels", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"format": "qrels", "records": 4, "skipped": 0, "errors": []}
    assert cli_main(["data", "check", str(FIX / "tevatron_new.jsonl"), "--corpus",
                     str(FIX / "tevatron_corpus.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    assert cli_main(["data", "check", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ Arrow loader
def test_arrow_collection_shards_partition_the_collection(tmp_path):
    from convret.data.arrow import iter_passages, load_collection

    for name in ("collection.jsonl", "tevatron_corpus.jsonl", "collection.tsv"):
        expected = list(read_collection(FIX / name))
        full = load_collection(FIX / name, cache_dir=tmp_path / "cache")
        assert list(iter_passages(full)) == expected
        shards = [list(iter_passages(load_collection(FIX / name, cache_dir=tmp_path / "cache", rank=r,
                                                     world_size=2))) for r in range(2)]
        assert shards[0] + shards[1] == expected and abs(len(shards[0]) - len(shards[1])) <= 1
