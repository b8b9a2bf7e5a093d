"""The passage store of ``convret serve``: the texts it answers equal the collection's, a duplicate id is refused
with its file and lines, the store is built once and reused, rebuilt when the collection or the index changes,
a file it did not write is never replaced, a failed build leaves nothing behind, and the service holds no
passage text in memory."""
import gc
import json
import os
import tracemalloc

import pytest

from convret.data import read_collection
from convret.serve.store import STORE_NAME, PassageStore, StoreError, build_store, open_store


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def collection(tmp_path):
    rows = [{"id": f"d{i}", "text": f"text of passage {i} \u00e9\u4e2d", **({"title": f"T{i}"} if i % 2 else {})}
            for i in range(50)]
    return write(tmp_path / "collection.jsonl", rows)


def test_the_store_answers_the_collection_s_texts(tmp_path, collection):
    ids = [f"d{i}" for i in range(0, 50, 3)]
    store = open_store(tmp_path / "idx" / STORE_NAME, collection, ids)
    want = {p.id: (p.text, p.title) for p in read_collection(collection)}
    assert len(store) == 50
    assert store.get(ids[::-1] + ids[:2]) == [want[i] for i in ids[::-1] + ids[:2]]
    assert store.get([]) == []
    with pytest.raises(KeyError):
        store.get(["nope"])
    assert oct((tmp_path / "idx" / STORE_NAME).stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_duplicate_id_is_refused_with_its_file_and_lines(tmp_path):
    path = write(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "c", "text": "z"},
                                        {"id": "b", "text": "again"}])
    with pytest.raises(StoreError, match=r"c\.jsonl:4: duplicate passage id 'b' \(first on line 2\)"):
        open_store(tmp_path / STORE_NAME, path, ["a"])
    assert os.listdir(tmp_path) == ["c.jsonl"]  # the failed build left nothing


def test_built_once_reused_rebuilt_on_change_never_over_a_foreign_file(tmp_path, collection):
    path = tmp_path / STORE_NAME
    logs = []
    ids = ["d1", "d2"]
    open_store(path, collection, ids, log=logs.append)
    assert len(logs) == 1 and "building" in logs[0]
    built = path.stat().st_mtime_ns
    open_store(path, collection, ids, log=logs.append)
    assert len(logs) == 1 and path.stat().st_mtime_ns == built  # reused as it was
    open_store(path, collection, ["d1", "d3"], log=logs.append)  # another index
    assert "index's passage ids changed" in logs[-1]
    write(collection, [{"id": "d1", "text": "new text"}, {"id": "d3", "text": "z"}])
    store = open_store(path, collection, ["d1", "d3"], log=logs.append)
    assert "collection file changed" in logs[-1] and store.get(["d1"]) == [("new text", "")]
    foreign = tmp_path / "other.sqlite"
    foreign.write_bytes(b"my own data")
    with pytest.raises(StoreError, match="not a passage store written by convret serve"):
        open_store(foreign, collection, ["d1"])
    assert foreign.read_bytes() == b"my own data"


def test_passages_of_the_index_missing_from_the_collection_are_named(tmp_path, collection):
    with pytest.raises(StoreError, match=r"2 passage ids of the index are not in the collection \(first: 'x"):
        open_store(tmp_path / STORE_NAME, collection, ["d1", "x1", "x2"])
    assert not (tmp_path / STORE_NAME).exists()


def test_every_collection_format_the_readers_take(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("1\tfirst text\n2\tsecond\ttext with a tab\n", encoding="utf-8")
    build_store(tmp_path / "s.sqlite", tsv, ["1", "2"], fmt="tsv")
    store = PassageStore(tmp_path / "s.sqlite")
    assert store.get(["2", "1"]) == [("second\ttext with a tab", ""), ("first text", "")]


def test_the_service_holds_no_passage_text(tmp_path):
    """20,000 passages of 1 kB (20 MB of text) beside a tiny index: the service's Python heap after loading is
    far below the text's size (a dict of the collection holds about 1.1 kB per passage here)."""
    pytest.importorskip("faiss")
    from convret.cli import main as cli
    from convret.serve.service import SearchService
    from _retrieval_fixtures import tiny_checkpoint, write_collection

    ck = tiny_checkpoint(tmp_path / "ck")
    small = write_collection(tmp_path / "small.jsonl", 30)
    assert cli(["encode", "--model", str(ck), "--collection", str(small), "--output", str(tmp_path / "emb"),
                "--no-progress"]) == 0
    assert cli(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx"), "--cpu"]) == 0
    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as out, open(small, encoding="utf-8") as head:
        out.write(head.read())
        filler = "w1 " * 333
        for i in range(20_000):
            out.write(json.dumps({"id": f"extra{i}", "text": f"{i} {filler}"}) + "\n")
    gc.collect()
    tracemalloc.start()
    try:
        service = SearchService.load(ck, tmp_path / "idx", big, cache_mb=1)
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced: held {held / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert len(service.store) == 20_030
    assert held < 6 * 2**20, held  # the texts are 20 MB
    assert peak < 8 * 2**20, peak  # a dict of the collection: 20+ MB
    hits = service.store.get(["extra19999", "d0"])
    assert hits[0][0].startswith("19999 w1 w1")
