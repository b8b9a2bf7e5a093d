"""Acceptance corpus: real files other projects published (``../shared/realdata`` with ``SOURCES.md``).

Every file of a format convret reads is detected as that format and parses with the record count SOURCES.md gives
and nothing skipped; every other file is an error at detection (never taken for a format it is not); the query ids
a reader produces are the ids the set's own qrels use. Skipped when the folder is absent (it is never copied into
this repository: the files belong to their projects); ``CONVRET_REALDATA=DIR`` points at it from elsewhere."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from convret.data import DataError, ReadReport, detect_format, read_conversations, read_qrels
from convret.data.cli import check_file

# ``../shared/realdata`` beside the repository (CI's layout); CONVRET_REALDATA overrides (a git worktree elsewhere)
REALDATA = Path(os.environ.get("CONVRET_REALDATA")
                or Path(__file__).resolve().parents[1].parent / "shared" / "realdata")
pytestmark = pytest.mark.skipif(not (REALDATA / "SOURCES.md").is_file(), reason=f"{REALDATA} is absent")

# the format of every file convret reads; every other file of SOURCES.md must fail detection
EXPECTED = {
    "anserini/beir-nfcorpus_corpus.jsonl": "beir-corpus",
    "anserini/beir_collection1_segment1.jsonl": "beir-corpus",
    "anserini/msmarco-v1-passage_docs00.json": "pyserini",
    "anserini/msmarco_v2.1_doc_segmented_00.json": "msmarco-v2.1-segmented",
    "anserini/msmarco_v2_passage_docs.json": "msmarco-v2-passage",
    "anserini/qrels.cacm.txt": "qrels",
    "anserini/run.sample.msmarco-v1-passage.txt": "run",
    "anserini/run_same_scores.txt": "run",
    "anserini/sample-topics.msmarco-passage-dev-openai-ada2.tsv": "tsv",
    "anserini/sample_qrels_Trec.txt": "qrels",
    "chatretriever/demonstration.json": "chatretriever-eval",
    "convdr_style/coted/cast19/eval_topics.jsonl": "convdr",
    "convdr_style/coted/cast19/evaluation_topics_annotated_resolved_v1.0.tsv": "tsv",
    "convdr_style/coted/cast19/queries.raw.tsv": "tsv",
    "convdr_style/coted/cast20/eval_topics.jsonl": "convdr",
    "ikat/2023/2023_test_topics.json": "ikat",
    "ikat/2023/2023_test_topics_psg_text.jsonl": "ikat-passages",
    "ikat/2023/2023_train_topics.json": "ikat",
    "ikat/2023/ptkb_rel_nist.txt": "qrels",
    "ikat/2024/2024_test_topics.json": "ikat",
    "ikat/2025/2025_test_topics.json": "ikat",
    "ir_datasets_dummy/docs.tsv": "tsv",
    "ir_datasets_dummy/qrels.txt": "qrels",
    "ir_datasets_dummy/queries.tsv": "tsv",
    "ir_measures/compat.qrels": "qrels",
    "ir_measures/compat.run": "run",
    "ir_measures/cwl.qrels": "qrels",
    "ir_measures/cwl.run": "run",
    "llm4cs/cast19_qrel.tsv": "qrels",
    "llm4cs/cast19_test.json": "chatretriever-eval",
    "llm4cs/cast20_qrel.tsv": "qrels",
    "llm4cs/cast20_test.json": "chatretriever-eval",
    "llm4cs/cast21_human_evaluation.part.json": "chatretriever-eval",
    "llm4cs/cast21_qrel.tsv": "qrels",
    "llm4cs/cast21_test.json": "chatretriever-eval",
    "llm4cs/demonstrations.json": "chatretriever-eval",
    "mtrag/clapnq_lastturn.jsonl": "beir-queries",
    "mtrag/clapnq_qrels_dev.tsv": "beir-qrels",
    "mtrag/clapnq_questions.jsonl": "beir-queries",
    "mtrag/clapnq_rewrite.jsonl": "beir-queries",
    "mtrag/mtragun_fiqa_qrels.tsv": "beir-qrels",
    "pyserini/nfcorpus-qrels.tsv": "qrels",
    "pyserini/nfcorpus-queries.tsv": "tsv",
    "pyserini/sample_collection_dense_documents1.jsonl": "pyserini",
    "pyserini/sample_collection_json_array_documents.json": "pyserini",
    "pyserini/sample_collection_json_emoji_doc.json": "pyserini",
    "pyserini/sample_collection_jsonl_documents.jsonl": "pyserini",
    "pyserini/sample_queries_nonint_qid.tsv": "tsv",
    "pyserini/sample_queries_zh.tsv": "tsv",
    "pyserini/simple_cacm_corpus.json": "pyserini",
    "pyserini/simple_cacm_corpus_fields_key.json": "collection",
    "pyserini/simple_mrtydi_corpus_fields_key.json": "collection",
    "pyserini/simple_scifact.jsonl": "pyserini",
    "pyserini/simple_trec_run_fusion_1.txt": "run",
    "pyserini/simple_trec_run_msmarco_doc1.txt": "run",
    "pyserini/simple_trec_run_read.txt": "run",
    "qrecc/qrecc_test.first4.json": "qrecc",
    "scai-qrecc21/ground-truth.json": "scai-qrecc",
    "splade_toy/dev_queries_raw.tsv": "tsv",
    "splade_toy/full_collection_raw.tsv": "tsv",
    "splade_toy/val_queries_raw.tsv": "tsv",
    "t5qr/test.sample.json": "t5qr",
    "t5qr/train.sample.json": "t5qr",
    "tevatron/biology.tsv": "qrels",
    "tevatron/qrel_evidence.txt": "qrels",
    "tevatron_format/rlhn/fiqa.stage_1.gpt-4o-mini.jsonl": "tevatron",
    "tevatron_format/rlhn/msmarco_passage.stage_1.gpt-4o-mini.jsonl": "tevatron",
    "trec_cast/2019/2019qrels.txt": "qrels",
    "trec_cast/2019/evaluation_topics_annotated_resolved_v1.0.tsv": "tsv",
    "trec_cast/2019/evaluation_topics_v1.0.json": "cast",
    "trec_cast/2019/train_topic_sample_annotated_resolved_v1.0.tsv": "tsv",
    "trec_cast/2019/train_topics_mod.qrel": "qrels",
    "trec_cast/2019/train_topics_v1.0.json": "cast",
    "trec_cast/2020/2020_automatic_evaluation_topics_v1.0.json": "cast",
    "trec_cast/2020/2020_manual_evaluation_topics_v1.0.json": "cast",
    "trec_cast/2020/2020qrels.txt": "qrels",
    "trec_cast/2020/automatic_evaluation_topics_annotated_v1.1.json": "cast",
    "trec_cast/2021/2021_automatic_evaluation_topics_v1.0.json": "cast",
    "trec_cast/2021/2021_manual_evaluation_topics_v1.0.json": "cast",
    "trec_cast/2021/org_convdr.run": "run",
    "trec_cast/2021/org_convdr.trec": "run",
    "trec_cast/2021/trec-cast-qrels-docs.2021.qrel": "qrels",
    "trec_cast/2022/2022_automatic_evaluation_topics_tree_v1.0.json": "cast2022",
    "trec_cast/2022/2022_evaluation_topics_flattened_duplicated_v1.0.json": "cast2022-flat",
    "trec_cast/2022/2022_evaluation_topics_tree_v1.0.json": "cast2022",
    "trec_eval/qrels.comment.test": "qrels",
    "trec_eval/qrels.test": "qrels",
    "trec_eval/qrels.test.with-comments": "qrels",
    "trec_eval/results.comment.test": "run",
    "trec_eval/results.test": "run",
    "trec_eval/results.trunc": "run",
}
HEADER_LINES = {"beir-qrels": 1, "dpr-tsv": 1}
# files whose ids repeat (convret encode refuses them; convret data check reports each repeat as a bad record)
REPEATED_IDS = {"splade_toy/dev_queries_raw.tsv": [(7, "1048876", 3), (9, "786786", 1)],
                "splade_toy/val_queries_raw.tsv": [(7, "1048876", 3)]}
# formats with one evaluation turn per turn of the file (CAsT 2022 counts System turns / repeats shared paths)
ONE_ITEM_PER_TURN = {"chatretriever-eval", "cast", "ikat"}


def _sources() -> dict[str, str]:
    """file -> its 'records in kept file' cell."""
    rows = {}
    for line in (REALDATA / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `([^`]+)` \|.*\| ([^|]+) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    rows = _sources()
    assert len(rows) >= 100 and set(EXPECTED) <= set(rows), set(EXPECTED) - set(rows)
    return rows


def _expected_records(name: str, fmt: str, cell: str) -> tuple[int, int | None]:
    """(records, items or None) that SOURCES.md's cell implies for this file."""
    path = REALDATA / name
    if m := re.fullmatch(r"(\d+) lines", cell):
        lines = path.read_text(encoding="utf-8").split("\n")
        lines = [line for line in lines if line.strip()]
        assert len(lines) == int(m.group(1)), (name, len(lines))
        comments = sum(line.lstrip().startswith("#") for line in lines) if fmt in ("qrels", "run") else 0
        return int(m.group(1)) - comments - HEADER_LINES.get(fmt, 0), None
    if m := re.fullmatch(r"(\d+) topics/conversations, (\d+) turns", cell):
        return int(m.group(1)), int(m.group(2)) if fmt in ONE_ITEM_PER_TURN else None
    if m := re.fullmatch(r"(\d+) (?:JSON array elements|topics)", cell):
        return int(m.group(1)), None
    if re.fullmatch(r"JSON object with \d+ top-level keys", cell):  # one object on one line: a one-record jsonl
        assert path.read_text(encoding="utf-8").strip().count("\n") == 0, name
        return 1, None
    raise AssertionError(f"{name}: cannot read the record count {cell!r}")


def test_every_supported_file_parses_with_its_record_count(sources):
    logging.getLogger("convret.data").setLevel(logging.ERROR)
    for name, fmt in EXPECTED.items():
        assert detect_format(REALDATA / name) == fmt, name
        records, items = _expected_records(name, fmt, sources[name])
        repeats = REPEATED_IDS.get(name, [])
        report = check_file(str(REALDATA / name), "auto", strict=not repeats)
        assert (report.format, report.records, report.skipped) == (fmt, records - len(repeats), len(repeats)), \
            (name, report.summary())
        assert report.errors == [(line, f"duplicate id {ident!r} (first at line {first}): ids must be unique")
                                 for line, ident, first in repeats]
        if items is not None:
            assert report.items == items, (name, report.items, items)


def test_no_other_file_is_detected_as_any_format(sources):
    others = sorted(set(sources) - set(EXPECTED))
    assert len(others) >= 15
    for name in others:
        with pytest.raises(DataError, match="cannot detect the format") as info:
            detect_format(REALDATA / name)
        assert str(REALDATA / name) in str(info.value)


def test_ikat_run_with_renamed_fields_fails_with_a_clear_reason():
    path = REALDATA / "ikat/2023/sample_run_renamed_fields.json"
    with pytest.raises(DataError, match=r"fits no format exactly.*no format convret reads fits it"):
        detect_format(path)
    with pytest.raises(DataError, match="missing field 'number'"):  # forced as iKAT topics: says what is wrong
        list(read_conversations(path, format="ikat", strict=True))


def test_cast2022_counts_against_the_files_own_structure():
    tree = json.loads((REALDATA / "trec_cast/2022/2022_evaluation_topics_tree_v1.0.json").read_text())
    users = [(t["number"], u["number"]) for t in tree for u in t["turn"] if u["participant"] == "User"]
    got = [(t.conv_id, t.turn_id) for t in read_conversations(
        REALDATA / "trec_cast/2022/2022_evaluation_topics_tree_v1.0.json", strict=True)]
    assert got == [(str(c), n) for c, n in users]
    flat = json.loads((REALDATA / "trec_cast/2022/2022_evaluation_topics_flattened_duplicated_v1.0.json").read_text())
    unique = list(dict.fromkeys(f"{t['number']}_{u['number']}" for t in flat for u in t["turn"]))
    assert [t.qid for t in read_conversations(
        REALDATA / "trec_cast/2022/2022_evaluation_topics_flattened_duplicated_v1.0.json", strict=True)] == unique


@pytest.mark.parametrize("topics, qrels", [
    ("ikat/2023/2023_test_topics.json", "ikat/2023/ptkb_rel_nist.txt"),  # '9-1_3'
    ("convdr_style/coted/cast19/eval_topics.jsonl", "llm4cs/cast19_qrel.tsv"),
    ("convdr_style/coted/cast19/eval_topics.jsonl", "trec_cast/2019/2019qrels.txt"),
    ("convdr_style/coted/cast20/eval_topics.jsonl", "trec_cast/2020/2020qrels.txt"),
    ("t5qr/test.sample.json", "llm4cs/cast20_qrel.tsv"),  # 'CAsT20-test_81_1' -> '81_1'
    ("trec_cast/2019/evaluation_topics_v1.0.json", "trec_cast/2019/2019qrels.txt"),
    ("trec_cast/2020/2020_manual_evaluation_topics_v1.0.json", "trec_cast/2020/2020qrels.txt"),
    ("trec_cast/2021/2021_manual_evaluation_topics_v1.0.json", "trec_cast/2021/trec-cast-qrels-docs.2021.qrel"),
    ("llm4cs/cast21_test.json", "llm4cs/cast21_qrel.tsv"),
    ("trec_cast/2019/evaluation_topics_annotated_resolved_v1.0.tsv", "trec_cast/2019/2019qrels.txt"),
    ("mtrag/clapnq_questions.jsonl", "mtrag/clapnq_qrels_dev.tsv"),  # '<hash><::>2'
    ("mtrag/clapnq_lastturn.jsonl", "mtrag/clapnq_qrels_dev.tsv"),
    ("mtrag/clapnq_rewrite.jsonl", "mtrag/clapnq_qrels_dev.tsv"),
    ("pyserini/nfcorpus-queries.tsv", "pyserini/nfcorpus-qrels.tsv"),  # BEIR's own ids, 'PLAIN-2'
])
def test_query_ids_are_the_ids_of_the_sets_qrels(topics, qrels):
    """Both files are prefixes of the originals: every judged qid of a conversation the topics prefix holds is a
    qid the reader produced, and they share at least one."""
    turns = list(read_conversations(REALDATA / topics, strict=True))
    judged = read_qrels(REALDATA / qrels, strict=True, report=ReadReport())
    qids = {t.qid for t in turns}
    last_turn = {}
    for t in turns:
        last_turn[t.conv_id] = t.qid
    covered = [q for q in judged if any(q.startswith(f"{c}_") or q.startswith(f"{c}<::>") or q == c
                                        for c in last_turn)]
    assert qids & set(judged)
    assert set(covered) <= qids, sorted(set(covered) - qids)[:5]


@pytest.mark.parametrize("topics, run", [
    ("ikat/2023/2023_test_topics.json", "ikat/2023/sample_run.json"),  # '9-1_1'
    ("ikat/2024/2024_test_topics.json", "ikat/2024/sample_run.json"),  # integer topic numbers: '0_1'
])
def test_ikat_qids_are_the_turn_ids_of_ikat_runs(topics, run):
    """iKAT's own run files (validated against its topics by its organisers' script) carry the qids of its qrels."""
    turns = list(read_conversations(REALDATA / topics, strict=True))
    convs = {t.conv_id for t in turns}
    run_ids = [t["turn_id"] for t in json.loads((REALDATA / run).read_text(encoding="utf-8"))["turns"]]
    covered = {qid for qid in run_ids if qid.rsplit("_", 1)[0] in convs}
    assert covered and covered <= {t.qid for t in turns}
