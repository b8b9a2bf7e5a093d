"""``convret bench retrieval``: the retrieval chain at scale: encode, index, search, on a synthetic collection.

A synthetic collection of ``--passages`` passages (default 1 M; ``--quick`` 100 k; ``--smoke`` 3 k, Flat and IVF only,
numbers meaningless) goes through
the real commands, each in a fresh process whose peak RSS (``VmHWM``) and wall time are recorded:

1. ``convret encode`` with a tiny Qwen2 retriever checkpoint built from a config (hidden 64, 1 layer, a
   word-level vocabulary of 512; nothing downloaded) on ``--encode`` passages (default: all, at most 300 k):
   passages/s. The passages are topical (each draws most of its words from one of 256 topics' word lists), so
   the embeddings have the cluster structure of a real collection. When fewer passages are encoded than
   ``--passages``, the remaining vectors are **synthesised**: an encoded vector chosen at random plus Gaussian
   noise (0.3 x the per-dimension standard deviation), re-normalised; the output says so.
2. The encode memory check: peak RSS of ``convret encode`` on the encoded collection against its peak on a
   tenth of it (same model, same ``--shard-size``): streaming keeps the difference near zero (target: within
   150 MB for 300 k vs 30 k).
3. ``convret index`` for Flat, IVF{nlist},Flat, HNSW32 and IVF{nlist},PQ{dim/4} (nlist = 4 sqrt(N) rounded to a
   power of two, at most N / 39; ``--smoke``: 4-bit PQ): build time, peak RSS, size on disk.
4. Search: ``--queries`` topical queries encoded the same way; recall@100 against Flat and queries/s for a
   sweep of nprobe (IVF) and efSearch (HNSW), in this process; then ``convret search`` at the defaults in a
   fresh process (peak RSS).
5. The same sweeps on the bundled sample world (2,400 passages, its evaluation sessions as queries), encoded
   with the same checkpoint (not with ``--smoke``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import harness as H

NAME = "retrieval"
TOPICS = 256
VOCAB_WORDS = 500
NPROBES = (1, 8, 32, 64, 128, 256, 512)
EF_SEARCHES = (64, 128, 256, 512)


# ------------------------------------------------------------------------------------------------- fixtures
def words() -> list[str]:
    return [f"t{i}" for i in range(VOCAB_WORDS)]


def tiny_retriever_checkpoint(path: str | os.PathLike, hidden: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """Save a random tiny Qwen2 convret retriever checkpoint (word-level tokenizer, 3 summary tokens)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    import convret.hf  # noqa: F401  (registers attn_implementation="convret")
    from convret.data.summary_tokens import add_summary_tokens
    from convret.train.checkpoint import RetrieverConfig, save_retriever

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + words() + ["user", "assistant", "system"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32), num_key_value_heads=1,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="convret")
    summary = add_summary_tokens(model, tokenizer, 3)
    cfg = RetrieverConfig(summary.tokens, summary.ids, normalize=True, max_session_len=256, max_passage_len=128)
    save_retriever(path, model, tokenizer, cfg)
    return Path(path)


def _topical_text(rng: random.Random, topic_words: list[list[str]], all_words: list[str], lo: int, hi: int) -> str:
    topic = topic_words[rng.randrange(len(topic_words))]
    return " ".join(rng.choice(topic) if rng.random() < 0.8 else rng.choice(all_words)
                    for _ in range(rng.randint(lo, hi)))


def write_synthetic_collection(path: str | os.PathLike, n: int, seed: int = 0, lo: int = 8, hi: int = 40,
                               prefix: str = "p") -> Path:
    """A jsonl collection of ``n`` topical passages ``{"id": "p{i}", "text": ...}`` (``lo``..``hi`` words)."""
    rng = random.Random(seed)
    all_words = words()
    topics = [random.Random(1000 + t).sample(all_words, 24) for t in range(TOPICS)]
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"{prefix}{i}", "text": _topical_text(rng, topics, all_words, lo, hi)})
                         + "\n")
    return path


# ------------------------------------------------------------------------------------------------- children
def cli_stage(argv: list[str]) -> dict[str, Any]:
    """Run ``convret ARGV`` in this (fresh) process: exit code, wall seconds, peak RSS."""
    from convret.cli import main

    started = time.perf_counter()
    code = main(list(argv))
    return {"rc": int(code), "seconds": time.perf_counter() - started, "peak_rss_bytes": H.peak_rss_bytes()}


def import_stage() -> dict[str, Any]:
    """Peak RSS of a fresh process that imports what ``convret index`` / ``search`` import, and does nothing."""
    import faiss  # noqa: F401

    import convret.cli  # noqa: F401
    import convret.retrieval.index  # noqa: F401
    import convret.retrieval.search  # noqa: F401

    return {"peak_rss_bytes": H.peak_rss_bytes()}


def run_stage(argv: list[str], threads: int | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    record = H.run_isolated("convret.bench.retrieval:cli_stage", {"argv": argv}, env=env)
    if record.get("status") != H.OK or record.get("rc") != 0:
        raise RuntimeError(f"convret {' '.join(argv)} failed: {record}")
    return record


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------- helpers
def synthesise(embeddings: Path, out: Path, total: int, seed: int = 0, shard_size: int = 100_000) -> int:
    """Extend the embedding directory ``embeddings`` to ``total`` vectors into ``out`` (encoded shards copied,
    the rest synthesised near encoded vectors). Returns how many were synthesised."""
    from convret.retrieval.embeddings import FORMAT_VERSION, META, iter_shards, read_meta, shard_name, write_shard

    meta = read_meta(embeddings)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    encoded = []
    for i, (start, ids, vectors) in enumerate(iter_shards(embeddings, meta)):
        write_shard(out, i, ids, np.asarray(vectors), {"synthetic": False})
        shards.append({"name": shard_name(i), "count": len(ids)})
        encoded.append(np.asarray(vectors, dtype=np.float32))
    base = np.concatenate(encoded)
    std = base.std(axis=0, keepdims=True)
    rng = np.random.default_rng(seed)
    done = len(base)
    s = len(shards)
    while done < total:
        n = min(shard_size, total - done)
        v = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, base.shape[1])).astype(np.float32) * 0.3 * std
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        write_shard(out, s, [f"s{done + i}" for i in range(n)], v.astype(np.float32), {"synthetic": True})
        shards.append({"name": shard_name(s), "count": n})
        done += n
        s += 1
    info = {**meta, "format_version": FORMAT_VERSION, "count": done, "shards": shards, "fingerprint": None,
            "synthesised": done - len(base)}
    (out / META).write_text(json.dumps(info, indent=2) + "\n")
    return done - len(base)


def recall_at(approx: np.ndarray, kth: np.ndarray, docs: np.ndarray, queries: np.ndarray) -> float:
    """recall@k against exact search, counting ties: a returned passage counts when its true inner product
    reaches the k-th exact score (less 1e-5), so equal or float-noise-equal scores at the cut-off are not
    misses. The true scores are recomputed from the vectors (PQ's returned scores are approximations)."""
    k = approx.shape[1]
    hits = 0
    for q, row in enumerate(approx):
        row = row[row >= 0]
        hits += int(np.sum(docs[row] @ queries[q] >= kth[q] - 1e-5))
    return hits / (k * len(approx))


def sweep(index_dir: Path, queries: np.ndarray, exact: tuple[np.ndarray, np.ndarray], param: str,
          values: tuple[int, ...], k: int) -> list[dict[str, Any]]:
    """``exact``: (k-th exact score per query, the passage vectors)."""
    from convret.retrieval.index import configure_search, load_index
    from convret.retrieval.search import search_index

    shards, _, _ = load_index(index_dir, use_gpu=False)
    out = []
    for value in values:
        for shard in shards:
            configure_search(shard, **{param: value})
        started = time.perf_counter()
        _, indices = search_index(shards, queries, k)
        seconds = time.perf_counter() - started
        out.append({param: value, "recall": recall_at(indices, exact[0], exact[1], queries),
                    "queries_per_s": len(queries) / seconds,
                    "ms_per_query": 1e3 * seconds / len(queries)})
    return out


def sample_world_sweep(ckpt: Path, work: Path, k: int) -> dict[str, Any]:
    """The bundled sample world (its collection and evaluation sessions) encoded with the bench checkpoint:
    recall@k against Flat for IVF and HNSW sweeps."""
    from convret.cli import main as convret_main
    from convret.data import sample_world as sw
    from convret.retrieval.embeddings import read_embeddings, read_meta
    from convret.retrieval.index import build_index, load_index
    from convret.retrieval.search import search_index

    base = Path(sw.SAMPLE_WORLD_DIR)
    for kind, source, out in (("--collection", base / sw.COLLECTION, work / "docs"),
                              ("--conversations", base / sw.EVAL, work / "queries")):
        if convret_main(["encode", "--model", str(ckpt), kind, str(source), "--output", str(out),
                         "--no-progress"]) != 0:
            raise RuntimeError(f"encoding {source} failed")
    n = read_meta(work / "docs")["count"]
    nlist = 2 ** max(2, min(round(math.log2(4 * math.sqrt(n))), int(math.log2(n / 39))))
    _, queries, _ = read_embeddings(work / "queries")
    build_index(work / "docs", work / "flat")
    shards, _, _ = load_index(work / "flat", use_gpu=False)
    scores, _ = search_index(shards, queries, min(k, n))
    exact = (scores[:, -1], read_embeddings(work / "docs")[1])
    result: dict[str, Any] = {"passages": n, "queries": len(queries), "results": {}}
    for factory, param, values in ((f"IVF{nlist},Flat", "nprobe", tuple(p for p in NPROBES if p <= nlist)),
                                   ("HNSW32", "ef_search", EF_SEARCHES)):
        build_index(work / "docs", work / factory, factory)
        result["results"][factory] = sweep(work / factory, queries, exact, param, values, min(k, n))
    return result


# ------------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passages", type=int, default=1_000_000, help="collection size N (default 1,000,000)")
    parser.add_argument("--encode", type=int, default=None,
                        help="passages actually encoded (default: all, at most 300,000); the rest are synthesised")
    parser.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="convret encode --shard-size (10,000)")
    parser.add_argument("--top-k", type=int, default=100, help="recall@k against Flat (100)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (OUT/retrieval-work)")


def run(args, argv: list[str]) -> int:
    import shutil

    if args.smoke:
        args.passages, args.encode, args.queries, args.shard_size = 3000, 3000, 100, 500
    elif args.quick:
        args.passages, args.queries = 100_000, 500
        args.encode = args.encode or 100_000
    encoded_n = min(args.passages, args.encode or min(args.passages, 300_000))
    small_n = max(1, encoded_n // 10)
    work = Path(args.out) / "retrieval-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    threads = args.threads
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "passages": args.passages,
                               "encoded": encoded_n, "queries": args.queries, "shard_size": args.shard_size,
                               "top_k": args.top_k, "plots": []}
    ckpt = tiny_retriever_checkpoint(work / "model")
    payload["model"] = {"hidden": 64, "layers": 1, "vocab": VOCAB_WORDS + 10}
    steps = H.progress(range(8), "bench retrieval")
    collection = write_synthetic_collection(work / "collection.jsonl", encoded_n)
    small = write_synthetic_collection(work / "small.jsonl", small_n)
    queries_file = write_synthetic_collection(work / "queries.jsonl", args.queries, seed=7, lo=4, hi=12, prefix="q")
    steps.update(1)

    def encode(source: Path, out: Path) -> dict[str, Any]:
        return run_stage(["encode", "--model", str(ckpt), "--collection", str(source), "--output", str(out),
                          "--shard-size", str(args.shard_size), "--no-progress"], threads)

    enc = encode(collection, work / "emb")
    enc["passages_per_s"] = encoded_n / enc["seconds"]
    steps.update(1)
    enc_small = encode(small, work / "emb-small")
    steps.update(1)
    payload["encode"] = {"large": {"passages": encoded_n, **enc}, "small": {"passages": small_n, **enc_small},
                         "peak_rss_difference_bytes": enc["peak_rss_bytes"] - enc_small["peak_rss_bytes"]}
    from convret.cli import main as convret_main

    if convret_main(["encode", "--model", str(ckpt), "--collection", str(queries_file), "--output",
                     str(work / "queries"), "--no-progress"]) != 0:  # in this process: no RSS wanted
        raise RuntimeError("encoding the queries failed")
    embeddings = work / "emb"
    synthesised = 0
    if args.passages > encoded_n:
        embeddings = work / "emb-full"
        synthesised = synthesise(work / "emb", embeddings, args.passages)
    payload["synthesised"] = synthesised
    payload["embeddings_bytes"] = dir_bytes(embeddings)
    steps.update(1)

    from convret.retrieval.embeddings import read_embeddings, read_meta
    from convret.retrieval.index import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, default_nprobe

    dim = read_meta(embeddings)["dim"]
    n = args.passages
    nlist = 2 ** max(4, min(round(math.log2(4 * math.sqrt(n))), int(math.log2(n / 39))))
    # --smoke: 4-bit PQ codebooks (16 centroids), which train in a second on a few thousand vectors
    factories = ["Flat", f"IVF{nlist},Flat", "HNSW32", f"IVF{nlist},PQ{dim // 4}" + ("x4" if args.smoke else "")]
    if args.smoke:  # fewer fresh processes, so that the CI smoke pass stays under a minute
        factories = factories[:2]
    baseline = H.run_isolated("convret.bench.retrieval:import_stage", {})
    payload["index"] = {}
    for factory in factories:
        out = work / ("index-" + factory.replace(",", "_"))
        record = run_stage(["index", "--embeddings", str(embeddings), "--output", str(out), "--factory", factory,
                            "--no-progress"], threads)
        record["index_bytes"] = dir_bytes(out) - (out / "ids.txt").stat().st_size
        record["train_sample"] = json.loads((out / "meta.json").read_text())["train_sample"]
        payload["index"][factory] = record
    payload["index_baseline_rss_bytes"] = baseline.get("peak_rss_bytes")
    steps.update(1)

    qids, queries, _ = read_embeddings(work / "queries")
    flat_dir = work / "index-Flat"
    from convret.retrieval.index import load_index
    from convret.retrieval.search import search_index

    shards, _, _ = load_index(flat_dir, use_gpu=False)
    started = time.perf_counter()
    scores, _ = search_index(shards, queries, args.top_k)
    flat_seconds = time.perf_counter() - started
    exact = (scores[:, -1], read_embeddings(embeddings)[1])
    payload["search"] = {"Flat": [{"recall": 1.0, "queries_per_s": len(queries) / flat_seconds,
                                   "ms_per_query": 1e3 * flat_seconds / len(queries)}]}
    for factory in factories[1:]:
        out = work / ("index-" + factory.replace(",", "_"))
        if factory.startswith("IVF"):
            payload["search"][factory] = sweep(out, queries, exact, "nprobe", tuple(p for p in NPROBES if p <= nlist),
                                               args.top_k)
        else:
            payload["search"][factory] = sweep(out, queries, exact, "ef_search", EF_SEARCHES, args.top_k)
    steps.update(1)
    payload["search_cli"] = {}
    for factory in factories[:1] if args.smoke else factories:
        out = work / ("index-" + factory.replace(",", "_"))
        payload["search_cli"][factory] = run_stage(
            ["search", "--index", str(out), "--queries", str(work / "queries"), "--top_k", str(args.top_k),
             "--output", str(work / f"run-{factory.replace(',', '_')}.trec"), "--no-progress", "--cpu"], threads)
    payload["defaults"] = {"nprobe": f"max({DEFAULT_NPROBE}, nlist / 8) = {default_nprobe(nlist)}",
                           "ef_search": DEFAULT_EF_SEARCH}
    payload["sample_world"] = None if args.smoke else sample_world_sweep(ckpt, work / "sample-world", args.top_k)
    steps.update(2)
    steps.close()
    payload["passed"] = True
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"


def format_report(payload: dict) -> str:
    enc = payload["encode"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"Tiny Qwen2 retriever (hidden {payload['model']['hidden']}, {payload['model']['layers']} layer, "
             f"word vocabulary {payload['model']['vocab']}), CPU, encode shards of {payload['shard_size']:,}.", ""]
    lines.append(f"Collection: {payload['passages']:,} passages; {payload['encoded']:,} encoded by `convret encode`"
                 + (f", {payload['synthesised']:,} vectors synthesised near encoded ones (an encoded vector + "
                    "Gaussian noise, re-normalised)" if payload["synthesised"] else "") +
                 f"; {payload['queries']:,} queries; embeddings {_mb(payload['embeddings_bytes'])} on disk.")
    lines += ["", "Encode (fresh process each):", "",
              H.markdown_table(["passages", "seconds", "passages/s", "peak RSS"], [
                  [f"{e['passages']:,}", f"{e['seconds']:.1f}", f"{e['passages'] / e['seconds']:,.0f}",
                   _mb(e["peak_rss_bytes"])] for e in (enc["small"], enc["large"])]),
              "", f"Peak RSS difference {enc['large']['passages']:,} vs {enc['small']['passages']:,} passages: "
                  f"{enc['peak_rss_difference_bytes'] / 1e6:+.1f} MB (target: within 150 MB).", ""]
    lines += ["Index (fresh process each; the process without work peaks at "
              f"{_mb(payload['index_baseline_rss_bytes'])}):", "",
              H.markdown_table(["factory", "build s", "peak RSS", "index size", "train sample"], [
                  [f, f"{r['seconds']:.1f}", _mb(r["peak_rss_bytes"]), _mb(r["index_bytes"]),
                   f"{r['train_sample']:,}" if r["train_sample"] else "-"] for f, r in payload["index"].items()])]
    rows = []
    for factory, results in payload["search"].items():
        for r in results:
            setting = next((f"{k} {v}" for k, v in r.items() if k in ("nprobe", "ef_search")), "exact")
            rows.append([factory, setting, f"{r['recall']:.3f}", f"{r['queries_per_s']:,.0f}",
                         f"{r['ms_per_query']:.2f}"])
    lines += ["", f"Search, recall@{payload['top_k']} against Flat (ties at the cut-off count as hits; in-process, "
                  "CPU, all queries in one batch):", "",
              H.markdown_table(["index", "setting", f"recall@{payload['top_k']}", "queries/s", "ms/query"], rows)]
    world = payload.get("sample_world")
    if world:
        rows = [[f, next(f"{k} {v}" for k, v in r.items() if k in ("nprobe", "ef_search")), f"{r['recall']:.3f}",
                 f"{r['queries_per_s']:,.0f}"] for f, results in world["results"].items() for r in results]
        lines += ["", f"Sample world ({world['passages']:,} passages, {world['queries']} evaluation sessions, the "
                      f"same random tiny checkpoint), recall@{payload['top_k']} against Flat:", "",
                  H.markdown_table(["index", "setting", f"recall@{payload['top_k']}", "queries/s"], rows)]
    lines += ["", f"`convret search` at the defaults (nprobe {payload['defaults']['nprobe']}, efSearch "
                  f"{payload['defaults']['ef_search']}), fresh process:", "",
              H.markdown_table(["index", "seconds", "peak RSS"], [
                  [f, f"{r['seconds']:.1f}", _mb(r["peak_rss_bytes"])] for f, r in payload["search_cli"].items()])]
    return "\n".join(lines)
