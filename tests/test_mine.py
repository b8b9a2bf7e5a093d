"""convret mine on the sample world: negatives are never positives, come from the rank window of the retriever's
own ranking (bm25s's scores; a numpy brute force over convret's embeddings), the file reads back, and a run killed
with SIGKILL finishes, when rerun, with the output of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convret.data import read_collection, read_training
from convret.data import sample_world as sw
from convret.retrieval import mine as mine_module

pytest.importorskip("bm25s")

WORLD = Path(sw.SAMPLE_WORLD_DIR)
CORPUS = WORLD / sw.COLLECTION
DRIVER = Path(__file__).resolve().parent / "_mine_driver.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    lines = (WORLD / sw.TRAIN_ULTRACHAT).read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "ultrachat.jsonl").write_text("".join(lines[:40]), encoding="utf-8")
    lines = (WORLD / sw.TRAIN_TRIPLETS).read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "triplets.jsonl").write_text("".join(lines[:120]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The embedded default's tiny model over the sample world's tokenizer, untrained (weights from init_seed)."""
    from convret.train.arguments import parse_arguments
    from convret.train.checkpoint import save_retriever
    from convret.train.model import build_model

    root = tmp_path_factory.mktemp("ckpt")
    m, d, l, _ = parse_arguments(["--output_dir", str(root / "run")])
    model, tokenizer, config = build_model(m, d, l)
    save_retriever(root / "ckpt", model, tokenizer, config)
    return root / "ckpt"


def _ranks(scores: np.ndarray, ids: list[str]) -> np.ndarray:
    """1-based rank of every passage: score descending, ties by docid."""
    order = np.lexsort((np.asarray(ids), -scores))
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[order] = np.arange(1, len(ids) + 1)
    return ranks


def _check_common(source: Path, mined: Path, num_negatives: int) -> list:
    """Same examples (ids, sessions, positives, responses, rewrites) with new negatives, none a positive."""
    before = list(read_training(source, strict=True))
    after = list(read_training(mined, strict=True))
    assert [e.id for e in before] == [e.id for e in after]
    for a, b in zip(before, after):
        assert (a.history, a.query, a.positive, a.response, a.rewrite) == (b.history, b.query, b.positive,
                                                                           b.response, b.rewrite)
        assert len(b.negatives) == num_negatives  # the window holds 16 passages, at most one of them the positive
        assert len({n.id for n in b.negatives}) == num_negatives
        for n in b.negatives:
            assert n.id != b.positive.id and n.text.strip() != b.positive.text.strip()
    return after


def test_bm25_negatives_come_from_the_window_of_bm25s_scores(files, tmp_path):
    import bm25s

    out = tmp_path / "mined.jsonl"
    assert mine_module.main(["--train-file", str(files / "ultrachat.jsonl"), "--corpus", str(CORPUS),
                             "--retriever", "bm25", "--output", str(out), "--num-negatives", "3", "--seed", "5",
                             "--no-progress"]) == 0
    assert not (tmp_path / "mined.jsonl.work").exists()
    after = _check_common(files / "ultrachat.jsonl", out, 3)
    # the oracle: bm25s's own scores, from an index built here
    passages = list(read_collection(CORPUS))
    ids = [p.id for p in passages]
    row = {p.id: i for i, p in enumerate(passages)}
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize([p.text for p in passages], stopwords="en", show_progress=False), show_progress=False)
    seen_ranks = set()
    for ex in after:  # no rewrite in this file: the query is the session's user turns and the query
        text = "\n".join([t.text for t in ex.history if t.role == "user"] + [ex.query])
        ranks = _ranks(np.asarray(bm25.get_scores(bm25s.tokenize([text], stopwords="en", return_ids=False,
                                                                   show_progress=False)[0])), ids)
        for n in ex.negatives:
            assert 15 <= ranks[row[n.id]] <= 30, (ex.id, n.id, ranks[row[n.id]])
            seen_ranks.add(int(ranks[row[n.id]]))
    assert len(seen_ranks) >= 12  # the draw spreads over the window
    # same seed: same file; another seed: other draws
    again = tmp_path / "again.jsonl"
    mine_module.main(["--train-file", str(files / "ultrachat.jsonl"), "--corpus", str(CORPUS), "--retriever", "bm25",
                      "--output", str(again), "--num-negatives", "3", "--seed", "5", "--no-progress"])
    assert again.read_bytes() == out.read_bytes()
    mine_module.main(["--train-file", str(files / "ultrachat.jsonl"), "--corpus", str(CORPUS), "--retriever", "bm25",
                      "--output", str(again), "--num-negatives", "3", "--seed", "6", "--no-progress", "--overwrite"])
    assert again.read_bytes() != out.read_bytes()


def test_dense_negatives_come_from_the_window_of_a_brute_force_ranking(files, checkpoint, tmp_path):
    from convret.retrieval.encoder import Encoder

    out = tmp_path / "mined.jsonl"
    ratio = 0.9
    report = mine_module.mine(files / "triplets.jsonl", CORPUS, mine_module.make_retriever(str(checkpoint)), out,
                              mine_module.MineSettings(window=(5, 20), num_negatives=2, seed=1,
                                                       max_positive_ratio=ratio), progress=False)
    before = list(read_training(files / "triplets.jsonl", strict=True))
    after = list(read_training(out, strict=True))
    assert [e.id for e in before] == [e.id for e in after] and report["mined"] == len(after)
    encoder = Encoder.from_checkpoint(checkpoint)
    passages = list(read_collection(CORPUS))
    ids = [p.id for p in passages]
    row = {p.id: i for i, p in enumerate(passages)}
    P = encoder.encode_passages(passages).astype(np.float64)
    Q = encoder.encode_sessions([([], ex.rewrite) for ex in after]).astype(np.float64)  # auto: the rewrite
    pos = encoder.encode_passages([ex.positive for ex in after]).astype(np.float64)
    kept = 0
    for q, p, ex, old in zip(Q, pos, after, before):
        scores = P @ q
        ranks = _ranks(scores, ids)
        by_rank = np.sort(scores)[::-1]
        positive_score = float(p @ q)
        for n in ex.negatives:
            assert n.id != ex.positive.id and n.text != ex.positive.text
            s = scores[row[n.id]]
            # the window, allowing for float noise between packed and one-by-one encoding at its edges
            assert 5 <= ranks[row[n.id]] <= 20 or by_rank[19] - 1e-5 <= s <= by_rank[4] + 1e-5, (ex.id, n.id)
            assert s <= ratio * positive_score + 1e-5  # the false-negative filter
        allowed = [i for i in np.argsort(ranks)[4:20] if ids[i] != ex.positive.id
                   and scores[i] <= ratio * positive_score - 1e-5]
        assert len(ex.negatives) >= min(2, len(allowed))
        kept += len(ex.negatives)
        assert (ex.positive, ex.response, ex.rewrite, ex.history) == (old.positive, old.response, old.rewrite,
                                                                      old.history)
    assert kept > 0 and report["filtered"] > 0  # the filter both kept and dropped some


def _mine_cmd(files, checkpoint, out, *extra):
    return [sys.executable, str(DRIVER), "--train-file", str(files / "ultrachat.jsonl"), "--corpus",
            str(files / "small_corpus.jsonl"), "--retriever", str(checkpoint), "--output", str(out),
            "--chunk-size", "4", "--shard-size", "100", "--no-progress", *extra]


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_output(files, checkpoint, tmp_path):
    """The reference runs in this process (the same code as the command); the killed run and its rerun are
    real processes, the first killed with SIGKILL after its third chunk of ten."""
    wanted = {e.positive.id for e in read_training(files / "ultrachat.jsonl")}
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (files / "small_corpus.jsonl").write_text("".join(line for n, line in enumerate(lines)
                                                      if n < 300 or json.loads(line)["id"] in wanted))
    reference = tmp_path / "reference.jsonl"
    assert mine_module.main(_mine_cmd(files, checkpoint, reference)[2:]) == 0

    out = tmp_path / "killed.jsonl"
    chunks = tmp_path / "killed.jsonl.work" / "chunks"
    env = {**os.environ, "CONVRET_TEST_CHUNK_SLEEP": "0.3"}
    proc = subprocess.Popen(_mine_cmd(files, checkpoint, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(chunks.glob("chunk-*.json"))) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    done = sorted(chunks.glob("chunk-*.json"))
    assert 3 <= len(done) < 10 and not out.exists()
    first = done[0].stat().st_mtime_ns
    rerun = subprocess.run(_mine_cmd(files, checkpoint, out, "--keep-work"), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert done[0].stat().st_mtime_ns == first  # kept, not mined again
    assert out.read_bytes() == reference.read_bytes()
    # other settings over the same work directory are refused
    assert mine_module.main(_mine_cmd(files, checkpoint, out, "--seed", "3", "--overwrite")[2:]) == 1


def test_records_round_trip_each_format(tmp_path):
    """Tevatron and triplet records written by the miner read back as the same examples."""
    from convret.data.records import Passage, TrainingExample, Turn

    tev = [TrainingExample("q1", [], "what is x", Passage("d1", "x is y", "X"), [Passage("d2", "z")])]
    tri = [TrainingExample("c1_2", [Turn("user", "hi"), Turn("assistant", "hello")], "and x?", Passage("d1", "x"),
                           [Passage("d3", "w")], "answer", "what is x"),
           TrainingExample("c1_3", [], "lm only", None, [], "just text", None)]
    for fmt, examples in (("tevatron", tev), ("topiocqa", tri)):
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(mine_module.record_of([e], fmt)) + "\n" for e in examples))
        assert list(read_training(path, strict=True)) == examples


def test_sentence_transformers_directory_as_the_retriever(files, checkpoint, tmp_path):
    """A sentence-transformers directory (the tiny checkpoint exported): its negatives come from the window of a
    numpy ranking of its own embeddings (encode_query on the rewrite, encode_document on the passages)."""
    from sentence_transformers import SentenceTransformer

    from convret.retrieval.export import export_sentence_transformers

    st_dir = export_sentence_transformers(checkpoint, tmp_path / "st", merge=True)
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    source = tmp_path / "train.jsonl"
    source.write_text("".join((files / "triplets.jsonl").read_text().splitlines(keepends=True)[:30]))
    wanted = {e.positive.id for e in read_training(source)}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(line for n, line in enumerate(lines) if n < 200 or json.loads(line)["id"] in wanted))
    retriever = mine_module.make_retriever(str(st_dir), shard_size=50)
    held = []
    embed = retriever.encoder.embed_tokens
    retriever.encoder.embed_tokens = lambda items, progress=None: (held.append(len(retriever.encoder._texts)),
                                                                   embed(items, progress))[1]
    retriever.prepare(corpus, tmp_path / "work", False)
    assert len(held) == -(-len(retriever.ids) // 50) and max(held) == 50  # the text table holds one shard
    out = tmp_path / "mined.jsonl"
    assert mine_module.main(["--train-file", str(source), "--corpus", str(corpus), "--retriever", str(st_dir),
                             "--output", str(out), "--window", "3-12", "--num-negatives", "3", "--no-progress"]) == 0
    after = _check_common(source, out, 3)
    model = SentenceTransformer(str(st_dir), device="cpu")
    passages = list(read_collection(corpus))
    ids = [p.id for p in passages]
    row = {p.id: i for i, p in enumerate(passages)}
    P = model.encode_document([p.text for p in passages], normalize_embeddings=True).astype(np.float64)
    Q = model.encode_query([ex.rewrite for ex in after], normalize_embeddings=True).astype(np.float64)
    for q, ex in zip(Q, after):
        scores = P @ q
        ranks, by_rank = _ranks(scores, ids), np.sort(scores)[::-1]
        for n in ex.negatives:
            s = scores[row[n.id]]
            assert 3 <= ranks[row[n.id]] <= 12 or by_rank[11] - 1e-5 <= s <= by_rank[2] + 1e-5, (ex.id, n.id)


def test_the_positive_and_its_text_twin_are_never_drawn_and_the_ratio_filter_applies():
    """A fixed ranking d0, d1, ... (scores 1 -> 0) that puts the positive (d16) and a passage with its text (d20)
    inside the window 15-30: neither is ever drawn; with the ratio filter, nothing above ratio x positive is."""
    from convret.data.records import Passage, TrainingExample

    passages = [Passage(f"d{i}", f"text {i}") for i in range(40)]
    passages[20] = Passage("d20", "text 16")
    curve = np.linspace(1.0, 0.0, 40)

    class Fixed:
        def rank(self, queries, positives, depth):
            n = len(queries)
            return np.tile(curve[:depth], (n, 1)), np.tile(np.arange(depth), (n, 1)), np.full(n, 0.6)

    examples = [TrainingExample(f"q{i}", [], "q", passages[16], []) for i in range(20)]
    mined, stats = mine_module.mine_examples(examples, list(range(20)), Fixed(), passages,
                                             mine_module.MineSettings(window=(15, 30), num_negatives=16))
    window = {f"d{r - 1}" for r in range(15, 31)} - {"d16", "d20"}
    assert all({n.id for n in ex.negatives} == window for ex in mined) and stats["filtered"] == 0
    mined, stats = mine_module.mine_examples(examples, list(range(20)), Fixed(), passages,
                                             mine_module.MineSettings(window=(15, 30), num_negatives=3,
                                                                      max_positive_ratio=0.8))
    allowed = {f"d{r - 1}" for r in range(15, 31) if curve[r - 1] <= 0.8 * 0.6} - {"d16", "d20"}
    assert all(len(ex.negatives) == 3 and {n.id for n in ex.negatives} <= allowed for ex in mined)
    assert stats["filtered"] == 20 * len(window - allowed)
    assert len({tuple(n.id for n in ex.negatives) for ex in mined}) > 1  # each example draws its own


def _write_world(root: Path, passages: int, text_chars: int, examples: int = 20) -> tuple[Path, Path]:
    """A collection of ``passages`` random-word passages of about ``text_chars`` characters, written line by line,
    and a triplet training file whose gold passages are its first ``examples`` passages."""
    rng = np.random.default_rng(passages)
    base = " ".join(f"w{i}" for i in rng.integers(0, 5000, 400_000))
    starts = rng.integers(0, len(base) - text_chars, passages)
    corpus, train = root / "corpus.jsonl", root / "train.jsonl"
    golds = []
    with open(corpus, "w", encoding="utf-8") as out:
        for n in range(passages):
            text = f"passage {n}: {base[starts[n] : starts[n] + text_chars]}"
            out.write(json.dumps({"id": f"p{n}", "text": text}) + "\n")
            if n < examples:
                golds.append({"id": f"p{n}", "text": text})
    with open(train, "w", encoding="utf-8") as out:
        for n, gold in enumerate(golds):
            out.write(json.dumps({"Conversation_no": n, "Turn_no": 1, "Question": f"question {n}",
                                  "Gold_passage": gold}) + "\n")
    return train, corpus


def test_dense_mining_memory_does_not_grow_with_the_corpus_texts(tmp_path):
    """Peak RSS of a fresh process (peak reset after its imports) mining against 5,000 and 50,000 passages of
    2,000 characters (10 MB and 100 MB of text): it grows by the ids, hashes and index (measured ~8 MB), far less
    than the 90 MB of text the larger collection adds (the corpus held as passages grew it by ~110 MB)."""
    peaks = {}
    for n in (5_000, 50_000):
        root = tmp_path / str(n)
        root.mkdir()
        train, corpus = _write_world(root, n, 2000)
        run = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "_mine_memory_driver.py"),
                              str(train), str(corpus), str(root / "out.jsonl")], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["mined"] == 20
        peaks[n] = result["maxrss_kb"] / 1024
    growth = peaks[50_000] - peaks[5_000]
    assert growth < 30, peaks  # MB; 90 MB of extra text held would exceed it


def _oracle_rankings(spec: str, passages, queries: list[str], depth: int) -> list[tuple[list, np.ndarray]]:
    """``(rows, scores)`` of the ``depth`` best passages for each query text, from an oracle that shares no code
    with the miner's ranking: ``"bm25"``: bm25s's own scores over an index built here (score > 0: what BM25
    retrieved); ``"dense"``: a numpy float64 brute force over the embeddings of tests/_mine_memory_driver.py's
    CheapEncoder (each text a seeded random vector, so that equal texts have equal vectors and the order is
    exact), not encode's shards, faiss or search_index. Score descending, ties by docid."""
    ids = np.asarray([p.id for p in passages])
    if spec == "bm25":
        import bm25s

        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize([f"{p.title} {p.text}" if p.title else p.text for p in passages], stopwords="en",
                                  show_progress=False), show_progress=False)
        table = [np.asarray(bm25.get_scores(bm25s.tokenize([q], stopwords="en", return_ids=False,
                                                           show_progress=False)[0]), dtype=np.float64)
                 for q in queries]
    else:
        from _mine_memory_driver import CheapEncoder, _vector

        encoder = CheapEncoder()
        P = encoder.embed_tokens([encoder.passage_tokens(p) for p in passages]).astype(np.float64)
        table = list(np.stack([_vector(q) for q in queries]).astype(np.float64) @ P.T)
    out = []
    for scores in table:
        order = [j for j in np.lexsort((ids, -scores)) if spec != "bm25" or scores[j] > 0][:depth + 1]
        gaps = -np.diff(scores[order])
        distinct = [passages[a].text != passages[b].text for a, b in zip(order, order[1:])]
        assert spec == "bm25" or not any(d and g < 1e-5 for d, g in zip(distinct, gaps)), \
            "near-ties between distinct texts: float32 and float64 may order them differently; change the seed"
        out.append((order[:depth], scores[order[:depth]]))
    return out


def _reference_output(spec: str, train: Path, corpus: Path, settings) -> bytes:
    """The miner's output as an independent reference computes it: the corpus held as passages, every example
    ranked by the oracle (:func:`_oracle_rankings`), the window's passages minus those equal to a positive by id
    or by stripped text, drawn as docs/data.md specifies (``random.Random(f"{seed}\\0{position}\\0{id}")``,
    ``sample``), written through ``record_of``."""
    import random
    from dataclasses import replace

    from convret.data import ReadReport

    passages = list(read_collection(corpus, strict=True))
    report = ReadReport()
    examples = list(read_training(train, corpus={p.id: p for p in passages}, report=report))
    lo, hi = settings.window
    todo = [i for i, ex in enumerate(examples) if ex.positive is not None]
    queries = [examples[i].rewrite or "\n".join([t.text for t in examples[i].history if t.role == "user"]
                                                 + [examples[i].query]) for i in todo]
    ranked = _oracle_rankings(spec, passages, queries, hi)
    new = list(examples)
    for (rows, scores), i in zip(ranked, todo):
        ex = examples[i]
        positives = ex.positives or [ex.positive]
        candidates = [r for r in rows[lo - 1 : hi] if passages[r].id not in {q.id for q in positives}
                      and passages[r].text.strip() not in {q.text.strip() for q in positives}]
        rng = random.Random(f"{settings.seed}\x00{i}\x00{ex.id}")
        new[i] = replace(ex, negatives=[passages[r] for r in rng.sample(candidates, min(settings.num_negatives,
                                                                                         len(candidates)))])
    groups = mine_module.group_records(new, report.format)
    return "".join(json.dumps(mine_module.record_of([new[i] for i in g], report.format), ensure_ascii=False) + "\n"
                   for g in groups).encode("utf-8")


def test_streamed_mining_writes_what_an_independent_reference_writes(files, tmp_path):
    """Byte for byte, for a dense retriever and for BM25, over a corpus where passages share a positive's text
    under other ids (dropped by the text filter, which the miner compares as hashes): the miner (streamed corpus,
    embedding shards, faiss, rows, text hashes, chunks, texts fetched by id at the end) against
    :func:`_reference_output` (the corpus in memory, rankings from bm25s / a numpy brute force, texts compared as
    strings). The dense retriever's encoder is a stand-in whose vectors the oracle can recompute exactly (a real
    model's packed float32 encodings tie within rounding on this corpus's duplicate texts); the checkpoint's own
    ranking is checked against a brute force in test_dense_negatives_come_from_the_window_of_a_brute_force_ranking."""
    from _mine_memory_driver import CheapEncoder

    source = tmp_path / "train.jsonl"
    source.write_text("".join((files / "triplets.jsonl").read_text().splitlines(keepends=True)[:40]))
    train = list(read_training(source))
    wanted = {e.positive.id for e in train}
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    twins = [json.dumps({"id": f"twin{k}", "text": e.positive.text}) + "\n" for k, e in enumerate(train[:15])]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join([*twins, *(line for n, line in enumerate(lines)
                                         if n < 250 or json.loads(line)["id"] in wanted)]))
    settings = mine_module.MineSettings(window=(1, 12), num_negatives=4, seed=3)
    for spec in ("dense", "bm25"):
        out = tmp_path / f"mined-{spec}.jsonl"
        retriever = mine_module.DenseRetriever(CheapEncoder(), "cheap", shard_size=100) if spec == "dense" else \
            mine_module.BM25Retriever()
        mine_module.mine(source, corpus, retriever, out, settings, chunk_size=7, progress=False)
        assert out.read_bytes() == _reference_output(spec, source, corpus, settings), spec
        after = list(read_training(out))
        assert sum(len(e.negatives) for e in after) > 3 * len(after)
        assert not any(n.id.startswith("twin") and n.text == e.positive.text for e in after for n in e.negatives)


def _sparse_world(root: Path) -> tuple[Path, Path]:
    """60 passages of common words; the words "zebra" and "quokka" are in 2 of them each (the positive and one
    other), "lantern" in 40: a query of one of the rare words retrieves 2 passages under BM25."""
    rng = np.random.default_rng(0)
    common = ["river", "town", "mountain", "forest", "bridge", "market", "harbour", "valley"]
    texts = [" ".join(rng.choice(common, 6)) for _ in range(60)]
    for n in (3, 7):
        texts[n] += " zebra"
    for n in (11, 50):
        texts[n] += " quokka"
    for n in range(12, 52):
        texts[n] += " lantern"
    corpus, train = root / "corpus.jsonl", root / "train.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{n:02d}", "text": t}) + "\n" for n, t in enumerate(texts)))
    rows = [("zebra", 3), ("quokka", 11), ("lantern", 12), ("zebra", 7)]
    train.write_text("".join(json.dumps({"Conversation_no": k, "Turn_no": 1, "Question": q, "Rewrite": q,
                                         "Gold_passage": {"id": f"p{n:02d}", "text": texts[n]}}) + "\n"
                             for k, (q, n) in enumerate(rows)))
    return train, corpus


def test_bm25_never_draws_a_passage_it_did_not_retrieve(tmp_path, caplog):
    """A query retrieving 2 passages (its positive and one other) gets that one in window 1-30 and none in the
    default 15-30 (not the first passages in docid order, which score 0); a query retrieving 40 gets its 4. The
    examples that got fewer than asked are counted in the report, its summary and the log. Oracle: bm25s's own
    scores."""
    import logging

    train, corpus = _sparse_world(tmp_path)
    for window, expected in (((1, 30), {"0_1": {"p07"}, "1_1": {"p50"}, "3_1": {"p03"}}),
                             ((15, 30), {"0_1": set(), "1_1": set(), "3_1": set()})):
        out = tmp_path / f"mined-{window[0]}.jsonl"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="convret.mine"):
            report = mine_module.mine(train, corpus, mine_module.BM25Retriever(), out,
                                      mine_module.MineSettings(window=window, num_negatives=4), progress=False)
        mined = {e.id: e for e in read_training(out, strict=True)}
        for qid, negatives in expected.items():
            assert {n.id for n in mined[qid].negatives} == negatives, (window, qid)
        assert len(mined["2_1"].negatives) == 4
        passages = list(read_collection(corpus))
        (rows, scores), = _oracle_rankings("bm25", passages, ["lantern"], 30)
        window_ids = {passages[r].id for r in rows[window[0] - 1 : window[1]]}
        assert {n.id for n in mined["2_1"].negatives} <= window_ids - {"p12"} and (scores > 0).all()
        assert report["fewer_than_asked"] == 3
        summary = mine_module.format_report(report, mine_module.MineSettings(window=window, num_negatives=4))
        assert "3 examples got fewer than 4" in summary
        assert any("3 of 4 examples got fewer than 4 negatives" in r.getMessage() for r in caplog.records)


def test_rank_scores_sorts_only_what_it_returns(monkeypatch):
    """100,000 passages, 50 retrieved (10 of them tied with each other): the 30 best by score, ties by docid (a
    numpy oracle), and no sort ever sees more than the retrieved passages."""
    rng = np.random.default_rng(1)
    scores = np.zeros(100_000, dtype=np.float32)
    hit = rng.choice(len(scores), 50, replace=False)
    scores[hit] = rng.uniform(1, 5, 50)
    scores[hit[:10]] = 3.0
    id_rank = rng.permutation(len(scores))
    expected = [j for j in np.lexsort((id_rank, -scores)) if scores[j] > 0][:30]
    sorted_sizes = []
    lexsort = np.lexsort
    monkeypatch.setattr(np, "lexsort", lambda keys, *a, **k: (sorted_sizes.append(len(keys[0])),
                                                               lexsort(keys, *a, **k))[1])
    monkeypatch.setattr(np, "argsort", lambda *a, **k: pytest.fail("a full argsort"))
    monkeypatch.setattr(np, "sort", lambda *a, **k: pytest.fail("a full sort"))
    assert mine_module.rank_scores(scores, 30, id_rank).tolist() == expected
    assert sorted_sizes and max(sorted_sizes) <= 50
    assert mine_module.rank_scores(scores, 80, id_rank).tolist() == expected + \
        [j for j in np.lexsort((id_rank, -scores)) if scores[j] > 0][30:]


def test_every_tevatron_positive_is_written_back_and_none_is_drawn(tmp_path):
    """Tevatron queries with 2 or 3 positives (the extra ones passages BM25 ranks in the window), in the legacy
    schema (texts) and the new one (document ids): the output's positives are the input's, all of them, and no
    negative is any of them (by id or text)."""
    lines = (WORLD / sw.TRAIN_ADHOC).read_text(encoding="utf-8").splitlines(keepends=True)[:30]
    single = tmp_path / "single.jsonl"
    single.write_text("".join(lines))
    first = tmp_path / "first.jsonl"
    args = ["--corpus", str(CORPUS), "--retriever", "bm25", "--window", "1-30", "--num-negatives", "29",
            "--no-progress"]
    assert mine_module.main(["--train-file", str(single), "--output", str(first), *args]) == 0
    legacy, new = tmp_path / "legacy.jsonl", tmp_path / "new.jsonl"
    with open(legacy, "w") as a, open(new, "w") as b:
        for n, line in enumerate(first.read_text(encoding="utf-8").splitlines()):
            record = json.loads(line)
            record["positive_passages"] += record.pop("negative_passages")[: 2 + n % 2]
            a.write(json.dumps(record) + "\n")
            b.write(json.dumps({"query_id": record["query_id"], "query_text": record["query"],
                                "positive_document_ids": [p["docid"] for p in record["positive_passages"]]}) + "\n")
    expected = [e.positives for e in read_training(legacy)]
    assert all(len(p) in (3, 4) for p in expected)
    for source in (legacy, new):
        out = tmp_path / f"mined-{source.name}"
        assert mine_module.main(["--train-file", str(source), "--output", str(out), *args]) == 0
        after = list(read_training(out, strict=True))
        assert [e.positives for e in after] == expected
        for e in after:
            assert len(e.negatives) >= 20
            for n in e.negatives:
                assert all(n.id != p.id and n.text.strip() != p.text.strip() for p in e.positives)
