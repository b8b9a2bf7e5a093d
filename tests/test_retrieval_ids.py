"""Id files (convret.retrieval.ids): one format, written and read by one module, for encode, index, search, mine
and serve. Ids holding characters ``str.splitlines()`` splits on (U+2028, U+0085, \\x0b, ...) go through encode ->
index -> search and the BM25 miner unchanged; what the format cannot hold is refused where it enters, naming the
id and the input's file and line."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convret.retrieval.embeddings import read_embeddings, write_embeddings
from convret.retrieval.ids import IdFileError, concatenate_ids, count_ids, id_problem, iter_ids, read_ids, write_ids

from _retrieval_fixtures import random_text, tiny_checkpoint

# every character str.splitlines() ends a line at, besides \n and \r
SPLITLINES_ONLY = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
LINE_ENDS = "\n\r" + SPLITLINES_ONLY
# any code point, lone surrogates included, with the line-end characters drawn often
CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(LINE_ENDS))
IDS = st.lists(st.text(CHARS, max_size=8), max_size=12)


def _unwritable(ident: str) -> bool:
    """The oracle of what the format cannot hold: a \\n or \\r, or a code point without a UTF-8 encoding."""
    return "\n" in ident or "\r" in ident or any(0xD800 <= ord(c) <= 0xDFFF for c in ident)


@settings(max_examples=150, deadline=None)
@given(ids=IDS)
def test_write_then_read_is_the_identity(ids):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ids.txt"
        bad = [i for i in ids if _unwritable(i)]
        if bad:
            with pytest.raises(IdFileError, match=re.escape(repr(bad[0]))):
                write_ids(path, ids)
            assert not path.exists()  # nothing half-written
            return
        assert write_ids(path, ids) == len(ids)
        assert read_ids(path) == ids
        assert count_ids(path) == len(ids)
        for block in (1, 2, 5, 1 << 20):  # block edges inside multi-byte characters
            assert list(iter_ids(path, block_size=block)) == ids
        if ids and len(set(ids)) == len(ids):  # through an embedding directory's shards, and an index's ids.txt
            write_embeddings(Path(tmp) / "emb", ids, np.zeros((len(ids), 2), np.float32), shard_size=5)
            assert read_embeddings(Path(tmp) / "emb")[0] == ids
            concatenate_ids(sorted((Path(tmp) / "emb").glob("part-*.ids")), Path(tmp) / "index-ids.txt")
            assert read_ids(Path(tmp) / "index-ids.txt") == ids


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.lists(st.text(st.one_of(st.characters(codec="utf-8", exclude_characters="\n\r"),
                                                        st.sampled_from(SPLITLINES_ONLY)), max_size=6),
                               max_size=5), max_size=4))
def test_concatenation_reads_back_as_the_ids_in_order(parts):
    with tempfile.TemporaryDirectory() as tmp:
        sources = []
        for n, ids in enumerate(parts):
            sources.append(Path(tmp) / f"part-{n}.ids")
            write_ids(sources[-1], ids)
        assert concatenate_ids(sources, Path(tmp) / "all.txt") == sum(map(len, parts))
        assert read_ids(Path(tmp) / "all.txt") == [i for ids in parts for i in ids]


def test_id_problem_names_exactly_what_the_format_cannot_hold():
    for c in SPLITLINES_ONLY + "\t \x00\ufeff\u200b":
        assert id_problem(f"a{c}b") is None, repr(c)
    assert "line feed" in id_problem("a\nb") and "carriage return" in id_problem("a\rb")
    assert "surrogate" in id_problem("a\ud800b")


def test_the_reader_refuses_what_the_writer_never_writes(tmp_path):
    """A CRLF file, a file cut short, bytes that are not UTF-8: errors naming the file and line."""
    cases = {"crlf.ids": (b"a\nb\r\nc\n", ":2: a carriage return"), "cut.ids": (b"a\nb\nc", ":3: the last line"),
             "latin1.ids": (b"a\nb\n\xe9t\xe9\n", ":3: not UTF-8")}
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for read in (read_ids, lambda p: list(iter_ids(p, block_size=2)),
                     lambda p: concatenate_ids([p], tmp_path / "out.txt")):
            with pytest.raises(IdFileError, match=re.escape(f"{path}{message}")):
                read(path)


# ------------------------------------------------------------------------------------------ end to end
ODD_IDS = ["a\u2028b", "c\x85d", "e\x0bf", "g\x0ch", "i\x1cj", "k\x1dl", "m\x1en", "o\u2029p", "q r", "r\u200bs"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ids-model") / "ckpt")


def _odd_collection(path: Path, n: int = 30) -> list[tuple[str, str]]:
    """``n`` passages whose ids (every third one) hold the characters above."""
    import random

    rng = random.Random(3)
    rows = [(ODD_IDS[i // 3 % len(ODD_IDS)] + str(i) if i % 3 == 0 else f"d{i}", random_text(rng, 3, 20))
            for i in range(n)]
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    return rows


def test_odd_ids_go_through_encode_index_and_search(model, tmp_path):
    """encode -> index (CLI, two embedding shards, two index shards) -> load_index: the ids are the collection's,
    row for row, and search_index ranks as a numpy brute force over the checkpoint's own embeddings. The TREC
    run of `convret search` cannot hold an id with whitespace: the search refuses before it starts, naming the id
    and the line of ids.txt it is on."""
    from convret.cli import main as cli
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.index import load_index
    from convret.retrieval.search import search_index

    rows = _odd_collection(tmp_path / "collection.jsonl")
    assert cli(["encode", "--model", str(model), "--collection", str(tmp_path / "collection.jsonl"), "--output",
                str(tmp_path / "docs"), "--shard-size", "16", "--no-progress"]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "index"),
                "--shard-size", "20", "--no-progress"]) == 0
    shards, ids, _ = load_index(tmp_path / "index")
    assert ids == [i for i, _ in rows]
    encoder = Encoder.from_checkpoint(model)
    from convret.data.records import Passage

    passages = encoder.encode_passages([Passage(i, t) for i, t in rows]).astype(np.float64)
    queries = encoder.encode_sessions([([], random_text(__import__("random").Random(k), 2, 6)) for k in range(5)])
    scores, indices = search_index(shards, queries, 10, ids=ids)
    for q, row in zip(queries.astype(np.float64), indices):
        brute = np.argsort(-(passages @ q), kind="stable")[:10]
        assert [ids[j] for j in row] == [rows[j][0] for j in brute]
    # the TREC run: whitespace-separated, so ids holding whitespace cannot be written to one
    (tmp_path / "eval.json").write_text(json.dumps([{"conv_id": "c1", "turns": [
        {"turn_id": 1, "question": "w1 w2"}]}]), encoding="utf-8")
    assert cli(["encode", "--model", str(model), "--conversations", str(tmp_path / "eval.json"), "--output",
                str(tmp_path / "queries"), "--no-progress"]) == 0
    error = _stderr_of(["search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"),
                        "--top_k", "5", "--output", str(tmp_path / "run.trec"), "--no-progress"])
    assert f"{tmp_path / 'index' / 'ids.txt'}:1: docid {ODD_IDS[0] + '0'!r}" in error and "TREC" in error
    assert not (tmp_path / "run.trec").exists()


def test_search_writes_a_run_with_ids_a_trec_run_can_hold(model, tmp_path):
    """Ids with characters other than whitespace (a zero-width space, a BOM, NUL, é) reach the run unchanged."""
    from convret.cli import main as cli
    from convret.data import read_run

    odd = ["x\u200by", "\ufeffz", "n\x00ul", "caf\u00e9", "\U0001f600"]
    rows = [(f"{odd[i % len(odd)]}{i}", f"w{i} w{i + 1} w{i + 2}") for i in range(12)]
    (tmp_path / "collection.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    (tmp_path / "eval.json").write_text(json.dumps([{"conv_id": "c\u200b1", "turns": [
        {"turn_id": 1, "question": "w1 w2"}, {"turn_id": 2, "question": "w5"}]}]), encoding="utf-8")
    for kind, src in (("docs", "--collection"), ("queries", "--conversations")):
        source = tmp_path / ("collection.jsonl" if kind == "docs" else "eval.json")
        assert cli(["encode", "--model", str(model), src, str(source), "--output", str(tmp_path / kind),
                    "--no-progress"]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "index"),
                "--no-progress"]) == 0
    assert cli(["search", "--index", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"), "--top_k",
                "12", "--output", str(tmp_path / "run.trec"), "--no-progress"]) == 0
    run = read_run(tmp_path / "run.trec", strict=True)
    assert set(run) == {"c\u200b1_1", "c\u200b1_2"}
    assert all(set(docs) == {i for i, _ in rows} for docs in run.values())


def _stderr_of(argv: list[str]) -> str:
    import contextlib
    import io

    from convret.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(argv) == 1
    return err.getvalue()


def test_an_id_the_format_cannot_hold_is_refused_naming_the_file_and_line(model, tmp_path):
    """Collections and conversation files, JSON and TSV; encode, mine and the Python API."""
    from convret.retrieval.embeddings import write_embeddings

    collection = tmp_path / "collection.jsonl"
    for k, (bad, raw) in enumerate((("x\ry", '"x\\ry"'), ("x\ny", '"x\\ny"'), ("x\ud800y", '"x\\ud800y"'))):
        collection.write_text('{"id": "d1", "text": "w1"}\n\n{"id": "d2", "text": "w2"}\n'
                              f'{{"id": {raw}, "text": "w3"}}\n', encoding="utf-8")
        for argv in (["encode", "--model", str(model), "--collection", str(collection), "--output",
                      str(tmp_path / "out"), "--no-progress"],
                     ["mine", "--train-file", str(_train_file(tmp_path)), "--corpus", str(collection), "--retriever",
                      "bm25", "--output", str(tmp_path / f"mined-{k}.jsonl"), "--no-progress"]):
            error = _stderr_of(argv)
            assert f"{collection}:4: id {bad!r}" in error, (argv[0], error)
    tsv = tmp_path / "collection.tsv"
    tsv.write_text("d1\tw1 w2\nd\r2\tw3\n", encoding="utf-8")  # a bare \r inside a TSV line is text
    assert f"{tsv}:2: id 'd\\r2'" in _stderr_of(["encode", "--model", str(model), "--collection", str(tsv),
                                                  "--format", "tsv", "--output", str(tmp_path / "out2"),
                                                  "--no-progress"])
    conversations = tmp_path / "eval.json"
    conversations.write_text('[\n{"conv_id": "c1", "turns": [{"turn_id": 1, "question": "w1"}]},\n'
                             '{"conv_id": "c\\n2", "turns": [{"turn_id": 1, "question": "w2"}]}\n]\n')
    assert f"{conversations}:3: id 'c\\n2_1'" in _stderr_of(
        ["encode", "--model", str(model), "--conversations", str(conversations), "--output", str(tmp_path / "q"),
         "--no-progress"])
    with pytest.raises(ValueError, match=re.escape("ids[3]: id 'a\\rb'")):
        write_embeddings(tmp_path / "api", ["a", "b", "c", "a\rb"], np.zeros((4, 2), np.float32), shard_size=2)


def _train_file(root: Path) -> Path:
    path = root / "train.jsonl"
    path.write_text(json.dumps({"Conversation_no": 1, "Turn_no": 1, "Question": "w1",
                                "Gold_passage": {"id": "d1", "text": "w1"}}) + "\n", encoding="utf-8")
    return path


def test_bm25_mining_keeps_odd_ids_on_their_passages(tmp_path):
    """Sample-world passages renamed with the odd ids (positives among them): every negative is the passage of
    its id, lies in the window of bm25s's own ranking and is never a positive."""
    import bm25s

    from convret.data import read_training
    from convret.data import sample_world as sw
    from convret.retrieval import mine as mine_module

    world = Path(sw.SAMPLE_WORLD_DIR)
    train = [json.loads(line) for line in (world / sw.TRAIN_TRIPLETS).read_text().splitlines()[:30]]
    golds = {t["Gold_passage"]["id"] for t in train}
    passages = [json.loads(line) for line in (world / sw.COLLECTION).read_text().splitlines()]
    keep = [p for n, p in enumerate(passages) if n < 300 or p["id"] in golds]
    rename = {p["id"]: f"{ODD_IDS[n % len(ODD_IDS)]}{n}" for n, p in enumerate(keep) if n % 2 == 0}
    for p in keep:
        p["id"] = rename.get(p["id"], p["id"])
    for t in train:
        t["Gold_passage"]["id"] = rename.get(t["Gold_passage"]["id"], t["Gold_passage"]["id"])
    corpus, source, out = tmp_path / "corpus.jsonl", tmp_path / "train.jsonl", tmp_path / "mined.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in keep), encoding="utf-8")
    source.write_text("".join(json.dumps(t) + "\n" for t in train), encoding="utf-8")
    assert sum(t["Gold_passage"]["id"] in rename.values() for t in train) >= 10
    assert mine_module.main(["--train-file", str(source), "--corpus", str(corpus), "--retriever", "bm25", "--output",
                             str(out), "--window", "1-8", "--num-negatives", "3", "--query", "rewrite",
                             "--no-progress"]) == 0
    ids, texts = [p["id"] for p in keep], {p["id"]: p["text"] for p in keep}
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize([p["text"] for p in keep], stopwords="en", show_progress=False), show_progress=False)
    mined = list(read_training(out, strict=True))
    assert sum(len(e.negatives) for e in mined) > 2 * len(mined)
    for ex in mined:
        scores = np.asarray(bm25.get_scores(bm25s.tokenize([ex.rewrite], stopwords="en", return_ids=False,
                                                           show_progress=False)[0]))
        order = np.lexsort((np.asarray(ids), -scores))
        window = {ids[j] for j in order[:8] if scores[j] > 0}
        for n in ex.negatives:
            assert n.text == texts[n.id] and n.id in window and n.id != ex.positive.id, (ex.id, n.id)
