"""The field's formats beyond the first readers: TREC iKAT, CAsT 2022, BEIR, ConvDR, T5QR, SCAI-QReCC, MS MARCO v2 /
v2.1, iKAT passages, pyserini, DPR TSV; exact-fit detection; the JSON-array chunk boundary and bare-CR defects."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from convret.cli import main as cli_main
from convret.data import (ASSISTANT, COLLECTION_FORMATS, CONVERSATION_FORMATS, FORMATS, QRELS_FORMATS, USER,
                          DataError, Passage, ReadReport, Turn, detect_format, read_collection, read_conversations,
                          read_qrels, read_training)
from convret.data.readers import _iter_json_array

FIX = Path(__file__).parent / "fixtures" / "data" / "formats"


@pytest.mark.parametrize("name, fmt", [
    ("ikat_2023.json", "ikat"), ("ikat_2025.json", "ikat"), ("cast2022_tree.json", "cast2022"),
    ("cast2022_flat.json", "cast2022-flat"), ("beir_corpus.jsonl", "beir-corpus"),
    ("beir_queries.jsonl", "beir-queries"), ("beir_qrels.tsv", "beir-qrels"), ("convdr.jsonl", "convdr"),
    ("t5qr.json", "t5qr"), ("scai_qrecc.json", "scai-qrecc"),
    ("msmarco_v2_passage.jsonl", "msmarco-v2-passage"), ("msmarco_v21_segmented.jsonl", "msmarco-v2.1-segmented"),
    ("ikat_passages.jsonl", "ikat-passages"), ("pyserini.jsonl", "pyserini"), ("dpr.tsv", "dpr-tsv"),
    ("queries.tsv", "tsv"), ("qrels_comments.txt", "qrels"),
])
def test_detect_format_of_each_fixture(name, fmt):
    assert detect_format(FIX / name) == fmt
    assert fmt in FORMATS


@pytest.mark.parametrize("name, reason, advice", [
    # a TSV with a header: read as id<TAB>text it would take the header for a passage, which is why it asks
    ("ikat_judgements.tsv", "cannot detect the format of this text file", "format=...: tsv, collection can"),
    ("triplets.tsv", "cannot detect the format of this text file", "format=...: tsv, collection, dpr-tsv can"),
    ("pretty_object.json", "one JSON object spread over several lines", "no convret format is a single JSON"),
    # no reader can read it: no advice to pass a format
    ("ikat_run.json", "fits no format exactly", "no format convret reads fits it"),
])
def test_files_of_no_format_are_errors_that_ask_for_format(name, reason, advice):
    with pytest.raises(DataError, match=reason) as info:
        detect_format(FIX / name)
    assert advice.replace("format=...:", "format=... (--format):") in str(info.value)
    assert ("format=" in str(info.value)) == ("format=" in advice)
    with pytest.raises(DataError):
        list(read_collection(FIX / name))


def test_format_names_in_one_place():
    assert set(CONVERSATION_FORMATS) | set(COLLECTION_FORMATS) | set(QRELS_FORMATS) <= set(FORMATS)
    assert len(set(FORMATS)) == len(FORMATS)
    for fmt in CONVERSATION_FORMATS:
        with pytest.raises(DataError):  # the format is accepted by name; the file is the wrong one
            list(read_conversations(FIX / "pretty_object.json", format=fmt, strict=True))
    for fmt in COLLECTION_FORMATS:
        with pytest.raises(DataError):
            list(read_collection(FIX / "pretty_object.json", format=fmt, strict=True))


# ------------------------------------------------------------------------------------------ conversations
def _read(name: str, fmt: str | None = None) -> tuple[list, ReadReport]:
    report = ReadReport()
    turns = list(read_conversations(FIX / name, format=fmt or "auto", strict=True, report=report))
    return turns, report


def test_ikat_2023_and_2024_topics():
    turns, report = _read("ikat_2023.json")
    assert (report.records, report.items) == (2, 4)
    assert [t.qid for t in turns] == ["9-1_1", "9-1_2", "9-1_3", "0_1"]  # iKAT qrels: '9-1_3'
    third = turns[2]
    assert (third.conv_id, third.turn_id, third.query) == ("9-1", "3", "And after it?")
    assert third.rewrite == "What vegetarian meals help recovery after a marathon?"
    assert third.response == "Protein and carbohydrates within an hour."
    assert [h.role for h in third.history] == [USER, ASSISTANT, USER, ASSISTANT]
    assert third.history[2] == Turn(USER, "What about before a race?")
    # numbered order ("10" after "2")
    assert third.ptkb == ["I live in Utrecht.", "I am vegetarian.", "I run marathons."]
    assert all(t.ptkb == turns[0].ptkb for t in turns[:3]) and turns[3].ptkb == ["I have two sisters."]


def test_ikat_2025_topics_renamed_fields():
    turns, _ = _read("ikat_2025.json")
    assert [t.qid for t in turns] == ["1-1_1", "1-1_2"]
    assert turns[1].query == "Yes." and turns[1].rewrite == "Yes, stomach acid reflux."
    assert turns[1].history == [Turn(USER, "Foods good for acid reflux?"),
                                Turn(ASSISTANT, "Do you mean stomach acid reflux?")]
    assert turns[1].ptkb == ["I eat dinner late at night.", "I don't like Apple products."]


def test_cast2022_tree_follows_parents():
    turns, report = _read("cast2022_tree.json")
    assert report.records == 1 and [t.qid for t in turns] == ["132_1-1", "132_1-3", "132_2-1"]
    branch = turns[2]  # 2-1's parent is 1-2: its session is 1-1, 1-2, not the 1-3 / 1-4 branch
    assert branch.history == [Turn(USER, "What was COP26 about?"), Turn(ASSISTANT, "COP26 was a UN climate summit.")]
    assert branch.rewrite == "Who attended COP26?" and branch.response == "About 200 countries."
    assert [h.text for h in turns[1].history] == ["What was COP26 about?", "COP26 was a UN climate summit."]


def test_cast2022_tree_errors(tmp_path):
    topic = json.loads((FIX / "cast2022_tree.json").read_text())[0]
    topic["turn"][4]["parent"] = "9-9"
    (tmp_path / "t.json").write_text(json.dumps([topic]))
    with pytest.raises(DataError, match="parent '9-9' is not a turn"):
        list(read_conversations(tmp_path / "t.json", format="cast2022", strict=True))
    topic["turn"][4]["parent"] = "2-2"  # 2-1 -> 2-2 -> 2-1
    (tmp_path / "t.json").write_text(json.dumps([topic]))
    with pytest.raises(DataError, match="loops"):
        list(read_conversations(tmp_path / "t.json", format="cast2022", strict=True))


def test_cast2022_flat_yields_each_turn_once():
    turns, report = _read("cast2022_flat.json")
    assert report.records == 2 and [t.qid for t in turns] == ["132_1-1", "132_1-3", "132_2-1"]
    assert turns[2].history == [Turn(USER, "What was COP26 about?"), Turn(ASSISTANT, "COP26 was a UN climate summit.")]
    tree = {t.qid: t for t in _read("cast2022_tree.json")[0]}
    for t in turns:  # the same sessions as the tree gives
        assert t.history == tree[t.qid].history and t.query == tree[t.qid].query


def test_convdr_both_variants():
    turns, _ = _read("convdr.jsonl")
    assert [(t.qid, t.conv_id, t.turn_id) for t in turns] == [("31_1", "31", "1"), ("31_2", "31", "2"),
                                                              ("81_1", "81", "1"), ("81_2", "81", "2")]
    assert turns[1].history == [Turn(USER, "What is throat cancer?")]
    assert turns[1].rewrite == "Is throat cancer treatable?"
    assert turns[2].rewrite is None  # null oracle_query
    assert turns[3].history == [Turn(USER, "How do garage door openers fail?"),
                                Turn(ASSISTANT, "The logic board may fail.")]


def test_t5qr_ids_drop_the_set_prefix():
    turns, _ = _read("t5qr.json")
    assert [t.qid for t in turns] == ["81_1", "81_2", "7625_3"]  # CAsT-20 qrels: '81_1'; QReCC: '7625_3'
    assert turns[0].history == []  # ctx_resps_text [""]: no response
    assert turns[1].history == [Turn(USER, "How do garage door openers fail?"),
                                Turn(ASSISTANT, "The logic board may fail.")]
    assert [h.role for h in turns[2].history] == [USER, ASSISTANT, USER, ASSISTANT]
    assert turns[2].rewrite == "Who directed Amadeus?"


def test_scai_qrecc_ground_truth():
    turns, _ = _read("scai_qrecc.json")
    assert [t.qid for t in turns] == ["1_1", "1_2"]
    assert turns[0].query == turns[0].rewrite == "What is a physician's assistant?"
    assert turns[0].positive_ids == ["https://example.org/pa.html_p0", "https://example.org/pa.html_p3"]
    assert turns[1].response == "A master's degree."


def test_beir_queries_and_mtrag_sessions_match_their_qrels():
    turns, _ = _read("beir_queries.jsonl")
    qrels = read_qrels(FIX / "beir_qrels.tsv", strict=True)
    assert [t.qid for t in turns] == list(qrels)
    assert turns[0].conv_id == "dd6b6ffd" and turns[0].turn_id == "2"
    assert turns[0].history == [Turn(USER, "where do the arizona cardinals play this week")]
    assert turns[0].query == "Do they play outside the US?"
    assert turns[2].query == "Do Cholesterol Statin Drugs Cause Breast Cancer?" and turns[2].history == []


def test_tsv_queries():
    turns, _ = _read("queries.tsv")
    assert [(t.qid, t.conv_id, t.turn_id, t.query) for t in turns] == [
        ("31_1", "31", "1", "What is throat cancer?"), ("31_2", "31", "2", "Is it treatable?"),
        ("1048585", "1048585", "", "what is paula deen's brother")]


# ------------------------------------------------------------------------------------------ collections, qrels
@pytest.mark.parametrize("name, expected", [
    ("beir_corpus.jsonl", [Passage("822086267_7384-8758-0-1374", "Week Date Opponent Result ...",
                                   "2017 Arizona Cardinals season"),
                           Passage("MED-10", "Statin use and breast cancer survival.")]),
    ("msmarco_v2_passage.jsonl", [Passage("msmarco_passage_00_0", "0-60 Times - 0-60 | 0 to 60 Times."),
                                  Passage("msmarco_passage_00_172",
                                          "Some still feel \u2013 however \u2013 that one time is not indicative.")]),
    ("msmarco_v21_segmented.jsonl", [Passage("msmarco_v2.1_doc_00_0#0_0",
                                             "0-60 Times\nThere are many ways to measure power.", "0-60 Times")]),
    ("ikat_passages.jsonl", [Passage("clueweb22-en0000-32-08101:4", "\nEmail is more efficient than social media."),
                             Passage("clueweb22-en0000-32-08101:5", "Email marketing isn\u2019t dead.")]),
    ("pyserini.jsonl", [Passage("doc1", "title1\ncontents of doc one."), Passage("doc2", "contents of document two.")]),
    ("dpr.tsv", [Passage("1", 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.',
                         "Aaron"),
                 Passage("2", "A text with\ta tab and a line\nbreak inside its quotes.", "Title, quoted"),
                 Passage("3", "Unquoted text: donâ€™t panic.", "Mojibake")]),
])
def test_collections(name, expected):
    report = ReadReport()
    assert list(read_collection(FIX / name, strict=True, report=report)) == expected
    assert report.skipped == 0 and report.records == len(expected)  # the DPR header is no passage, no record


def test_dpr_header_is_not_a_passage_and_quotes_are_not_glued(tmp_path):
    """A DPR TSV with its header, read the way today's main did, gave a passage 'id' and a text with quotes."""
    passages = list(read_collection(FIX / "dpr.tsv", strict=True))
    assert "id" not in [p.id for p in passages]
    assert not any(p.text.startswith('"') or p.text.endswith('"') or '""' in p.text for p in passages)
    assert all("\t" not in p.text or p.id == "2" for p in passages)


def test_bare_carriage_return_inside_a_text_does_not_split_the_record(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"1\tfirst part\rsecond part\r\n2\tplain\r\n")
    assert [(p.id, p.text) for p in read_collection(path, strict=True)] == [("1", "first part\rsecond part"),
                                                                              ("2", "plain")]
    path = tmp_path / "c.jsonl"  # an unescaped CR inside a JSON string (a raw control character)
    path.write_bytes(b'{"id": "1", "text": "first part\rsecond part"}\n{"id": "2", "text": "plain"}\n')
    assert [p.text for p in read_collection(path, strict=True)] == ["first part\rsecond part", "plain"]
    path = tmp_path / "dpr.tsv"
    path.write_bytes(b'id\ttext\ttitle\n1\t"a\rb"\tT\n2\tc\rd\tU\n')
    assert [(p.id, p.text) for p in read_collection(path, strict=True)] == [("1", "a\rb"), ("2", "c\rd")]


def test_beir_qrels_and_trec_qrels_with_comments():
    with pytest.raises(DataError, match="holds no passages"):  # today's main read it as 4 passages, 'query-id' first
        list(read_collection(FIX / "beir_qrels.tsv"))
    report = ReadReport()
    qrels = read_qrels(FIX / "beir_qrels.tsv", report=report)
    assert qrels == {"dd6b6ffd<::>2": {"822086267_7384-8758-0-1374": 1},
                     "dd6b6ffd<::>3": {"822086267_7384-8758-0-1374": 2},
                     "PLAIN-2": {"MED-10": 1}}
    assert (report.format, report.records, report.skipped) == ("beir-qrels", 3, 0)
    report = ReadReport()
    assert read_qrels(FIX / "qrels_comments.txt", report=report) == {"31_1": {"CR#93E-1860": 1, "MARCO_5": 0},
                                                                     "31_2": {"CAR_ab12": 2}}
    assert (report.records, report.skipped) == (3, 0)


def test_pytrec_eval_reads_beir_qrels_as_we_do():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = read_qrels(FIX / "beir_qrels.tsv", strict=True)
    run = {qid: {doc: 1.0 for doc in docs} for qid, docs in qrels.items()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg"}).evaluate(run)
    assert set(scores) == set(qrels) and all(s["ndcg"] == 1.0 for s in scores.values())


# ------------------------------------------------------------------------------------------ the defects
def test_json_array_chunk_boundary_inside_a_literal(tmp_path):
    """A chunk that ends inside ``true`` / ``false`` / ``null`` (today's main: 'invalid JSON ...; the rest of the
    file cannot be read')."""
    for literal in ("true", "false", "null"):
        for cut in range(1, len(literal)):
            head = '[{"a": 1, "b": '
            text = head + literal + '}, {"a": 2, "b": ' + literal + "}]"
            path = tmp_path / "a.json"
            path.write_text(text)
            got = [obj for _, obj in _iter_json_array(path, chunk_size=len(head) + cut)]
            assert got == json.loads(text), (literal, cut, got)
    path.write_text("[12345, 6789]")  # a number cut by the boundary is not read as two numbers
    for size in range(1, 12):
        assert [obj for _, obj in _iter_json_array(path, chunk_size=size)] == [12345, 6789]


def test_topiocqa_file_with_false_everywhere_reads_every_turn(tmp_path):
    """A valid 1.8 MB TopiOCQA-style array with ``"is_nq": false`` in every record: today's main read 1,797 of
    3,000 turns (the rest was lost with one 'skipped' record)."""
    records = [{"Conversation_no": i // 10 + 1, "Turn_no": i % 10 + 1, "Question": f"question {i} " + "x" * (i % 97),
                "Answer": "an answer " + "y" * (i % 53), "Context": ["q", "a"] * (i % 10),
                "Gold_passage": {"id": f"wiki:{i}", "title": "T", "text": "passage text " * 40}, "is_nq": False,
                "Topic": "T", "Topic_section": "S"} for i in range(3000)]
    text = json.dumps(records, indent=2)
    # pad the first question so that the reader's first 1 MiB chunk ends inside a 'false' ('fa|lse')
    cut = (1 << 20) - 2
    records[0]["Question"] += " " * (cut - text.rindex("false", 0, cut))
    text = json.dumps(records, indent=2)
    assert text[cut:cut + 5] == "false" and text.isascii()
    path = tmp_path / "topiocqa.json"
    path.write_text(text)
    assert path.stat().st_size > 1 << 20
    report = ReadReport()
    assert len(list(read_training(path, report=report))) == 3000
    assert (report.format, report.records, report.skipped) == ("topiocqa", 3000, 0)
    report = ReadReport()
    assert len(list(read_conversations(path, report=report, strict=True))) == 3000


def test_ultrachat_conversation_ending_on_a_user_turn_keeps_its_earlier_turns(tmp_path):
    conv = {"conv_id": "u", "conversation": [{"role": "User", "text": "q1"}, {"role": "Assistant", "text": "a1"},
                                             {"role": "User", "text": "q2"}, {"role": "Assistant", "text": "a2"},
                                             {"role": "User", "text": "q3"}]}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(conv) + "\n")
    report = ReadReport()
    examples = list(read_training(path, report=report, strict=True))
    assert [e.id for e in examples] == ["u_1", "u_2"] and examples[1].positive.text == "a2"
    assert (report.records, report.skipped) == (1, 0)


def test_pretty_printed_object_vs_a_truncated_first_jsonl_line(tmp_path):
    path = tmp_path / "one.json"  # compact pretty-printing: the first line is not just '{'
    path.write_text('{"conv_id": "1",\n "turns": [{"turn_id": 1, "question": "q"}]}\n')
    with pytest.raises(DataError, match="one JSON object spread over several lines"):
        detect_format(path)
    path.write_text('{"conv_id": "1", "turns": [\n{"conv_id": "2", "turns": [{"turn_id": 1, "question": "q"}]}\n')
    report = ReadReport()  # a broken first line of a jsonl file is one bad record, the rest is read
    assert [t.qid for t in read_conversations(path, format="chatretriever-eval", report=report)] == ["2_1"]
    assert report.skipped == 1 and "invalid JSON" in report.errors[0][1]


def test_pretty_printed_object_is_rejected_clearly_when_a_format_is_forced():
    report = ReadReport()
    assert list(read_conversations(FIX / "pretty_object.json", format="chatretriever-eval", report=report)) == []
    assert report.skipped == 1 and "one JSON object spread over several lines" in report.errors[0][1]


def test_data_check_format_names(capsys):
    assert cli_main(["data", "check", str(FIX / "dpr.tsv"), "--format", "dpr-tsv", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["format"], out["records"], out["skipped"]) == ("dpr-tsv", 3, 0)
    assert cli_main(["data", "check", str(FIX / "beir_qrels.tsv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "beir-qrels"
    assert cli_main(["data", "check", str(FIX / "ikat_judgements.tsv")]) == 2
    assert "--format" in capsys.readouterr().err


def test_arrow_collection_gives_what_read_collection_gives(tmp_path):
    pytest.importorskip("datasets")
    from convret.data.arrow import iter_passages, load_collection

    crlf = tmp_path / "cr.tsv"  # CRLF line ends and a bare CR inside a text
    crlf.write_bytes(b"1\tfirst part\rsecond part\r\n2\tplain\r\n")
    for path in [FIX / name for name in ("beir_corpus.jsonl", "msmarco_v2_passage.jsonl", "msmarco_v21_segmented.jsonl",
                                         "ikat_passages.jsonl", "pyserini.jsonl")] + [crlf]:
        expected = list(read_collection(path, strict=True))
        assert list(iter_passages(load_collection(path, cache_dir=tmp_path / "cache"))) == expected, path.name
    with pytest.raises(DataError, match="read_collection"):
        load_collection(FIX / "dpr.tsv", cache_dir=tmp_path / "cache")
