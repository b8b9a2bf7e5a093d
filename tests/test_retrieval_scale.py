"""Retrieval at scale: streaming encode (memory, resume, fingerprints), torchrun, index shards, nprobe, peak RSS."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convret.retrieval.embeddings import read_embeddings, write_embeddings
from convret.retrieval.encode import main as encode_main
from convret.retrieval.encoder import Encoder
from convret.retrieval.index import build_index, main as index_main
from convret.retrieval.search import main as search_main

from _retrieval_fixtures import tiny_checkpoint, write_collection, write_eval_world


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


def _encode(ckpt, source, out, *extra, kind="--collection"):
    return encode_main(["--model", str(ckpt), kind, str(source), "--output", str(out), "--no-progress",
                        "--token-budget", "256", *extra])


def _peak_child(argv, env=None):
    """Peak RSS (VmHWM, bytes) of a fresh process running ``convret ARGV``."""
    code = ("import sys, json; from convret.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print('PEAK', json.dumps([rc, hwm]))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    line = [x for x in result.stdout.splitlines() if x.startswith("PEAK ")]
    assert line, result.stderr[-2000:]
    rc, peak = json.loads(line[-1][5:])
    assert rc == 0, result.stderr[-2000:]
    return peak


def _peaks_in_one_child(argvs):
    """Peak RSS (VmHWM, bytes) of each ``convret ARGV`` run in turn by one fresh process, the peak reset to the
    current RSS before each (Linux ``clear_refs``), so that one process start serves several measurements."""
    code = ("import sys, json; from convret.cli import main\n"
            "def hwm(): return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0]\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    open('/proc/self/clear_refs', 'w').write('5')\n"
            "    out.append([main(argv), hwm()])\n"
            "print('PEAKS', json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in result.stdout.splitlines() if x.startswith("PEAKS ")]
    assert line, result.stderr[-2000:]
    out = json.loads(line[-1][6:])
    assert all(rc == 0 for rc, _ in out), result.stderr[-2000:]
    return [peak for _, peak in out]


# ------------------------------------------------------------------------------------------------ encode
def test_reencoding_with_another_checkpoint_fails_and_overwrite_reencodes(ckpt, tmp_path, capsys):
    coll = write_collection(tmp_path / "c.jsonl", 9, seed=1)
    other = tiny_checkpoint(tmp_path / "other", seed=5)
    out = tmp_path / "emb"
    assert _encode(ckpt, coll, out, "--shard-size", "4") == 0
    first = read_embeddings(out)[1]
    capsys.readouterr()
    assert _encode(other, coll, out, "--shard-size", "4") == 1
    err = capsys.readouterr().err
    assert "another encoding" in err and "checkpoint:" in err and "--overwrite" in err
    np.testing.assert_array_equal(read_embeddings(out)[1], first)  # nothing touched
    # a partial re-encode (a shard of the new model) must not mix either: dtype differs too
    assert _encode(ckpt, coll, out, "--shard-size", "4", "--dtype", "float16") == 1
    assert "dtype: 'float32' -> 'float16'" in capsys.readouterr().err
    assert _encode(other, coll, out, "--shard-size", "4", "--overwrite") == 0
    ids, vectors, meta = read_embeddings(out)
    expected = Encoder.from_checkpoint(other).encode_passages([p for p in _passages(coll)])
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    from convret.retrieval.encode import checkpoint_identity

    assert meta["model"] == str(other) and meta["fingerprint"]["checkpoint"] == checkpoint_identity(other)
    assert checkpoint_identity(other) != checkpoint_identity(ckpt)


def _passages(path):
    from convret.data import read_collection

    return list(read_collection(path, strict=True))


def test_query_only_into_a_session_directory_names_the_difference(ckpt, tmp_path, capsys):
    world = write_eval_world(tmp_path / "w", n_conv=2, turns=2)
    out = tmp_path / "q"
    assert _encode(ckpt, world / "eval.json", out, kind="--conversations") == 0
    capsys.readouterr()
    assert _encode(ckpt, world / "eval.json", out, "--query-only", kind="--conversations") == 1
    assert "query_only: False -> True" in capsys.readouterr().err
    assert _encode(ckpt, world / "eval.json", out, "--format", "chatretriever-eval", kind="--conversations") == 1
    assert "format: 'auto' -> 'chatretriever-eval'" in capsys.readouterr().err


def test_resume_tokenises_only_unfinished_shards(ckpt, tmp_path, monkeypatch):
    coll = write_collection(tmp_path / "c.jsonl", 10, seed=3)
    out = tmp_path / "emb"
    assert _encode(ckpt, coll, out, "--shard-size", "3") == 0
    ids, vectors, _ = read_embeddings(out)
    for suffix in (".json", ".npy"):
        (out / f"part-00002{suffix}").unlink(missing_ok=True)  # shard 2 lost (rows 6..8)
    (out / "meta.json").unlink()
    seen = []
    real = Encoder.passage_tokens
    monkeypatch.setattr(Encoder, "passage_tokens", lambda self, p: (seen.append(p.id), real(self, p))[1])
    assert _encode(ckpt, coll, out, "--shard-size", "3") == 0
    assert seen == ["d6", "d7", "d8"]
    got_ids, got, _ = read_embeddings(out)
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)
    # a finished directory with the same fingerprint: nothing tokenised at all
    seen.clear()
    assert _encode(ckpt, coll, out, "--shard-size", "3") == 0
    assert seen == []


def test_duplicate_ids_across_shards(ckpt, tmp_path, capsys):
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({"id": i, "text": "w1 w2"}) + "\n"
                                                for i in ["a", "b", "c", "d", "b"]))
    assert _encode(ckpt, tmp_path / "dup.jsonl", tmp_path / "out", "--shard-size", "2") == 1
    assert "duplicate passage id 'b' (passages 2 and 5)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_torchrun_two_processes_equal_one(ckpt, tmp_path):
    coll = write_collection(tmp_path / "c.jsonl", 23, seed=8)
    assert _encode(ckpt, coll, tmp_path / "one", "--shard-size", "4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "convret",
         "encode", "--model", str(ckpt), "--collection", str(coll), "--output", str(tmp_path / "two"),
         "--shard-size", "4", "--token-budget", "256", "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "two").glob("part-*.json")]
    fingerprints = {r["fingerprint"]["checkpoint"] for r in records}
    assert len(fingerprints) == 1 and len(records) == 6
    one_ids, one, one_meta = read_embeddings(tmp_path / "one")
    two_ids, two, two_meta = read_embeddings(tmp_path / "two")
    assert two_ids == one_ids and two_meta["count"] == 23
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-7)
    assert two_meta["fingerprint"] == one_meta["fingerprint"]


def test_encode_peak_rss_does_not_grow_with_the_collection(tmp_path):
    """Peak RSS of `convret encode` on 24 k passages within 8 MB of its peak on 3 k (shards of 1,000)."""
    from convret.bench.retrieval import tiny_retriever_checkpoint, write_synthetic_collection

    model = tiny_retriever_checkpoint(tmp_path / "model", hidden=32)
    peaks = {}
    for n in (3_000, 24_000):
        coll = write_synthetic_collection(tmp_path / f"c{n}.jsonl", n, lo=12, hi=22)
        peaks[n] = _peak_child(["encode", "--model", str(model), "--collection", str(coll), "--output",
                                str(tmp_path / f"e{n}"), "--shard-size", "1000", "--token-budget", "4096",
                                "--no-progress"])
    print("encode peak RSS MiB", {n: p / 2**20 for n, p in peaks.items()})
    assert peaks[24_000] - peaks[3_000] < 8 << 20, {n: p / 2**20 for n, p in peaks.items()}


# ------------------------------------------------------------------------------------------------ index / search
def test_index_peak_rss_below_two_copies(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 160_000, 128
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    write_embeddings(tmp_path / "big", [f"p{i}" for i in range(n)], vectors, shard_size=20_000)
    write_embeddings(tmp_path / "tiny", ["a", "b"], vectors[:2])
    del vectors
    size = n * dim * 4
    base = _peak_child(["index", "--embeddings", str(tmp_path / "tiny"), "--output", str(tmp_path / "i0")])
    peak = _peak_child(["index", "--embeddings", str(tmp_path / "big"), "--output", str(tmp_path / "i1")])
    print("index peak above a tiny index, in copies of the embeddings:", (peak - base) / size)
    assert peak - base < 1.6 * size, (peak - base) / size  # the index (1 copy) + one block, never 2-3 copies


def _world(tmp_path, n, dim, q=40, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    if ties:
        docs[n // 2 :] = docs[: n - n // 2]
    queries = rng.standard_normal((q, dim)).astype(np.float32)
    write_embeddings(tmp_path / "docs", [f"p{i}" for i in range(n)], docs, shard_size=max(1, n // 3 + 1))
    write_embeddings(tmp_path / "queries", [f"q{i}" for i in range(q)], queries)
    return docs, queries


def _run(tmp_path, index, name, *extra, k=100):
    out = tmp_path / f"{name}.trec"
    assert search_main(["--index", str(tmp_path / index), "--queries", str(tmp_path / "queries"), "--top_k", str(k),
                        "--output", str(out), *extra]) == 0
    return out


def _topk(path):
    run = {}
    for line in open(path, encoding="utf-8"):
        q, _, d, *_ = line.split()
        run.setdefault(q, []).append(d)
    return run


@pytest.mark.parametrize("ties", [False, True])
def test_sharded_flat_search_equals_one_index(tmp_path, ties):
    _world(tmp_path, 1000, 16, ties=ties)
    assert index_main(["--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "one")]) == 0
    assert index_main(["--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "many"),
                       "--shard-size", "150", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "many" / "meta.json").read_text())
    assert [s["count"] for s in meta["shards"]] == [150] * 6 + [100]
    a = _run(tmp_path, "one", "one", k=37)
    b = _run(tmp_path, "many", "many", k=37)
    assert a.read_text() == b.read_text()


def test_ivf_default_nprobe_reaches_recall(tmp_path):
    """20 k vectors, IVF256,Flat: at the default nprobe recall@100 against Flat >= 0.95; nprobe 1 is far below
    (a search that ignores nprobe gets ~0.1)."""
    _world(tmp_path, 20_000, 32)
    build_index(tmp_path / "docs", tmp_path / "flat")
    info = build_index(tmp_path / "docs", tmp_path / "ivf", factory="IVF256,Flat")
    exact = _topk(_run(tmp_path, "flat", "flat"))
    default = _topk(_run(tmp_path, "ivf", "ivf"))

    def recall(run):
        return np.mean([len(set(run.get(q, [])) & set(d)) / 100 for q, d in exact.items()])

    assert recall(default) >= 0.95, recall(default)  # a search that leaves nprobe at 1: 0.07
    assert info["train_sample"] == 16_384  # 64 x nlist
    one = _topk(_run(tmp_path, "ivf", "ivf1", "--nprobe", "1"))
    assert recall(one) < 0.5
    from convret.retrieval.index import DEFAULT_NPROBE

    assert DEFAULT_NPROBE > 1


def test_hnsw_ef_search_is_applied(tmp_path):
    from convret.retrieval.index import configure_search, load_index

    _world(tmp_path, 500, 8)
    build_index(tmp_path / "docs", tmp_path / "hnsw", factory="HNSW16")
    shards, _, _ = load_index(tmp_path / "hnsw", use_gpu=False)
    assert configure_search(shards[0], nprobe=7, ef_search=123) == {"ef_search": 123}
    import faiss

    assert faiss.downcast_index(shards[0]).hnsw.efSearch == 123
    build_index(tmp_path / "docs", tmp_path / "sq", factory="IVF8,SQ8")
    shards, _, _ = load_index(tmp_path / "sq", use_gpu=False)
    assert configure_search(shards[0], nprobe=700) == {"nprobe": 8}  # capped at nlist


def test_search_says_where_it_runs(tmp_path, capsys):
    _world(tmp_path, 50, 8, q=3)
    build_index(tmp_path / "docs", tmp_path / "flat")
    capsys.readouterr()
    _run(tmp_path, "flat", "r", k=5)
    assert "searching on CPU" in capsys.readouterr().err


def test_evaluate_takes_dtypes_and_streams_the_collection(ckpt, tmp_path):
    """--model-dtype, --dtype, --shard-size and --format reach the chain; and the collection is streamed: the peak
    RSS of `convret evaluate` over 1,000 passages of 30,000 characters (30 MB of text) is within 12 MB of its peak
    over 100 such passages, both run in one fresh process, in shards of 50 passages (measured: about 1 MB; a chain
    that held the passages, or their texts, adds the 27 MB of text. The allocator keeps up to a shard's worth of
    freed text pages, so the shards are small here).
    Each passage is a few vocabulary words and one long unknown word: one token, so that the texts are large and
    the encoding cheap."""
    from convret.retrieval.evaluate import main as evaluate_main

    world = write_eval_world(tmp_path / "w", n_conv=3, turns=2)
    out = tmp_path / "eval"
    argv = ["--model", str(ckpt), "--conversations", str(world / "eval.json"), "--collection",
            str(world / "collection.jsonl"), "--qrels", str(world / "qrels.tsv"), "--contexts", "--top_k", "10"]
    assert evaluate_main(argv + ["--output", str(out), "--model-dtype", "float32", "--dtype", "float16",
                                 "--shard-size", "7", "--format", "chatretriever-eval"]) == 0
    (cache,) = (out / "cache").iterdir()
    assert cache.name.endswith("-float16")
    parts = sorted((cache / "embeddings").glob("part-*.npy"))
    assert len(parts) == 4 and np.load(parts[0]).dtype == np.float16  # 26 passages in shards of 7
    index_meta = json.loads((cache / "index" / "meta.json").read_text())
    assert index_meta["count"] == 26 and index_meta["factory"] == "Flat"
    full = json.loads((out / "results.json").read_text())["rows"][0]["measures"]
    assert evaluate_main(argv + ["--output", str(tmp_path / "eval32")]) == 0
    full32 = json.loads((tmp_path / "eval32" / "results.json").read_text())["rows"][0]["measures"]
    assert full == pytest.approx(full32, abs=0.05)
    runs = {}
    for n in (100, 1_000):
        root = write_eval_world(tmp_path / f"rss{n}", n_conv=3, turns=2)
        with open(root / "collection.jsonl", "a", encoding="utf-8") as handle:
            for i in range(n):
                handle.write(json.dumps({"id": f"f{i}", "text": f"w{i % 60} w{i % 7} {'z' * 30_000}{i}"}) + "\n")
        runs[n] = ["evaluate", "--model", str(ckpt), "--conversations", str(root / "eval.json"), "--collection",
                   str(root / "collection.jsonl"), "--qrels", str(root / "qrels.tsv"), "--contexts", "--top_k", "10",
                   "--shard-size", "50", "--output", str(root / "out")]
    peaks = dict(zip(runs, _peaks_in_one_child(list(runs.values()))))
    print("evaluate peak RSS MiB", {n: p / 2**20 for n, p in peaks.items()})
    assert peaks[1_000] - peaks[100] < 12 << 20, {n: p / 2**20 for n, p in peaks.items()}
