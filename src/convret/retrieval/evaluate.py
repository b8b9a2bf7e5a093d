"""``convret evaluate``: the whole chain from a checkpoint to a metrics table.

For each model (the checkpoint, then every ``--baseline``): encode the collection (cached per model and
collection under ``OUTPUT/cache/``), an exact inner-product index, encode the sessions, search, evaluate with
``convret eval``'s conventions. Extra rows: the model given only the current utterance (``--query-only``), the
model given the manual rewrite (``--rewrite``). Robustness (ChatRetriever's evaluation): NDCG@3 mean and
standard deviation over alternative-context versions of the same turns (``--contexts``).

With no data options it runs on the bundled sample world (its eval set, collection, qrels and context files).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .._args import parse
from .._io import atomic_write
from ..provenance import check_output, content_identity, read_record
from . import _data
from .encode import (DEFAULT_SHARD_SIZE, collection_records, conversation_items, encode_fingerprint,
                     encode_stream)
from .encoder import DEFAULT_TOKEN_BUDGET, Encoder
from .index import build_index, load_index
from .metrics import evaluate_run
from .search import search_index

__all__ = ["evaluate_chain", "markdown_table", "main"]

RESULTS = "results.json"
TABLE_COLUMNS = [("NDCG@3", "ndcg_cut_3"), ("NDCG@10", "ndcg_cut_10"), ("MRR@10", "recip_rank_cut_10"),
                 ("MAP", "map"), ("R@10", "recall_10"), ("R@100", "recall_100")]


def _cache_key(*paths: str | os.PathLike) -> str:
    """Cache key: the content identities of the files that determine the embeddings (the checkpoint, the
    collection)."""
    return hashlib.sha1(";".join(content_identity(p) for p in paths).encode()).hexdigest()[:16]


def _indexed_collection(encoder: Encoder, model: str, collection: str, cache: Path, fmt: str = "auto",
                        dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE) -> tuple[list[Any], list[str]]:
    """``(index shards, passage ids)``: the collection streamed into ``cache/collection-KEY-DTYPE/embeddings``
    (kept when its fingerprint matches) and an exact index built shard by shard from it into ``.../index`` (kept
    likewise)."""
    directory = cache / f"collection-{_cache_key(model, collection)}-{dtype}" / "embeddings"
    records, tokenize = collection_records(collection, encoder, fmt)
    fingerprint = encode_fingerprint(encoder, "passages", collection, fmt, dtype=dtype, shard_size=shard_size)
    meta = encode_stream(encoder, records, tokenize, directory, fingerprint, dtype, shard_size, "passages",
                         extra_meta={"source": str(collection)}, overwrite=True, source=str(collection))
    index_dir = directory.with_name("index")
    try:
        current = json.loads((index_dir / "meta.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        current = None
    if current != meta["fingerprint"] or current is None:
        build_index(directory, index_dir, "Flat", overwrite=True)
    shards, ids, _ = load_index(index_dir)
    return shards, ids


def _run_queries(encoder: Encoder, index: Any, doc_ids: list[str], conversations: str, top_k: int,
                 query_only: bool = False, query_field: str = "query", fmt: str = "auto"
                 ) -> dict[str, list[tuple[str, float]]]:
    qids, sequences = conversation_items(conversations, encoder, query_only, query_field, fmt)
    queries = encoder.embed_tokens(sequences)
    scores, indices = search_index(index, queries, top_k, ids=doc_ids)
    return {q: [(doc_ids[j], float(s)) for s, j in zip(scores[i], indices[i]) if j >= 0]
            for i, q in enumerate(qids)}


def _as_run(results: dict[str, list[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    return {q: dict(docs) for q, docs in results.items()}


def evaluate_chain(
    model: str,
    conversations: str,
    collection: str,
    qrels_path: str,
    output: str | os.PathLike,
    baselines: Sequence[str] = (),
    query_only: bool = False,
    rewrite: bool = False,
    contexts: Sequence[str] = (),
    top_k: int = 1000,
    rel_threshold: int = 1,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    device: str | None = None,
    allow_unknown_qrels: bool = False,
    model_dtype: str | None = None,
    dtype: str = "float32",
    fmt: str = "auto",
    collection_format: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run the chain; returns ``{"rows": [{"name", "model", "measures", "queries", "run", "judged"}], "robustness":
    ..., "fingerprint": ...}`` and writes every run to ``OUTPUT/runs/`` and the result to ``OUTPUT/results.json``.

    An ``OUTPUT`` whose ``results.json`` came from other models, data or settings is refused naming the difference,
    unless ``overwrite`` (then its earlier run files are deleted first); the same ones are evaluated again
    (:mod:`convret.provenance`). Every input is checked before a model is loaded. ``log`` is told of runs whose
    documents the qrels do not judge (:func:`~convret.retrieval.metrics.judged_documents`).

    Raises:
        ValueError: qrels naming queries the conversation file does not hold (unless ``allow_unknown_qrels``),
            and every error of the steps (empty collection, duplicate ids, ...).
    """
    output = Path(output)
    cache = output / "cache"
    for path in (conversations, *contexts):
        _data.check_input(path, fmt, "conversations")
    _data.check_input(collection, collection_format, "collection")
    fingerprint = {"models": [content_identity(m) for m in (model, *baselines)],
                   "conversations": content_identity(conversations), "collection": content_identity(collection),
                   "qrels": content_identity(qrels_path), "contexts": [content_identity(c) for c in contexts],
                   "query_only": query_only, "rewrite": rewrite, "top_k": top_k, "rel_threshold": rel_threshold,
                   "model_dtype": model_dtype, "dtype": dtype, "format": fmt, "collection_format": collection_format}
    previous = read_record(output / RESULTS)
    check_output(output / RESULTS, fingerprint, None if previous is None else previous.get("fingerprint"),
                 overwrite, "the results of an evaluation", "pass --overwrite to replace them, or another --output")
    if overwrite and previous is not None:
        for row in previous.get("rows", []):  # the earlier evaluation's runs (this one may write fewer)
            run = Path(str(row.get("run", "")))
            if run.parent == output / "runs" and run.suffix == ".trec":
                run.unlink(missing_ok=True)
    qrels = _data.load_qrels(qrels_path)
    turn_ids = {t.qid for t in _data.iter_conversations(conversations, fmt)}
    unknown = sorted(set(qrels) - turn_ids)
    if unknown and not allow_unknown_qrels:
        raise ValueError(f"{qrels_path}: qrels for {len(unknown)} queries that {conversations} does not hold "
                         f"(e.g. {unknown[:3]}; its query ids look like {sorted(turn_ids)[:3]}): wrong qrels or "
                         "conversation file (--allow-unknown-qrels to evaluate anyway)")
    if not set(qrels) & turn_ids:
        raise ValueError(f"{qrels_path}: no query in common with {conversations}")
    rows: list[dict[str, Any]] = []
    robustness = None

    def add_row(name: str, ckpt: str, results: dict[str, list[tuple[str, float]]]) -> None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
        run_path = output / "runs" / f"{len(rows):02d}-{slug}.trec"
        _data.save_run(run_path, results, tag=slug)
        metrics = evaluate_run(qrels, _data.load_run(run_path), rel_threshold)
        if metrics["judged"]["warning"] and log is not None:
            log(f"warning: {name} ({run_path}): {metrics['judged']['warning']}")
        rows.append({"name": name, "model": ckpt, "measures": metrics["measures"], "queries": metrics["queries"],
                     "graded_queries": metrics["graded_queries"], "missing": len(metrics["missing"]),
                     "run": str(run_path), "judged": metrics["judged"]})

    for position, ckpt in enumerate([model, *baselines]):
        encoder = Encoder.from_checkpoint(ckpt, device=device, token_budget=token_budget, dtype=model_dtype)
        index, doc_ids = _indexed_collection(encoder, ckpt, collection, cache, collection_format, dtype, shard_size)
        label = "model" if position == 0 else f"baseline {Path(ckpt).name or ckpt}"
        add_row(label, ckpt, _run_queries(encoder, index, doc_ids, conversations, top_k, fmt=fmt))
        if position == 0:
            if query_only:
                add_row("model, current utterance only",
                        ckpt, _run_queries(encoder, index, doc_ids, conversations, top_k, query_only=True, fmt=fmt))
            if rewrite:
                add_row("model, manual rewrite",
                        ckpt, _run_queries(encoder, index, doc_ids, conversations, top_k, query_field="rewrite",
                                           fmt=fmt))
            if contexts:
                values = []
                for context in contexts:
                    run = _run_queries(encoder, index, doc_ids, context, top_k, fmt=fmt)
                    metrics = evaluate_run(qrels, _as_run(run), rel_threshold)
                    values.append(metrics["measures"]["ndcg_cut_3"])
                robustness = {"ndcg_cut_3": values, "mean": statistics.fmean(values),
                              "std": statistics.pstdev(values), "contexts": [str(c) for c in contexts]}
        del encoder
    result = {"rows": rows, "robustness": robustness, "conversations": str(conversations),
              "collection": str(collection), "qrels": str(qrels_path), "rel_threshold": rel_threshold,
              "fingerprint": fingerprint}
    with atomic_write(output / RESULTS) as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The metrics table (markdown), one row per run, then the robustness line."""
    header = "| run | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for row in result["rows"]:
        cells = " | ".join(f"{row['measures'][key]:.3f}" for _, key in TABLE_COLUMNS)
        lines.append(f"| {row['name']} | {cells} |")
    if result["rows"]:
        first = result["rows"][0]
        lines.append(f"\nNDCG over {first.get('graded_queries', first['queries'])} queries (a passage of grade "
                     f">= 1), the other measures over {first['queries']} (a relevant passage at rel >= "
                     f"{result['rel_threshold']}); a query without results counts 0, trec_eval -c.")
    rob = result.get("robustness")
    if rob:
        lines.append(f"Robustness: NDCG@3 over {len(rob['ndcg_cut_3'])} alternative contexts: mean "
                     f"{rob['mean']:.3f}, std {rob['std']:.3f} (population std).")
    return "\n".join(lines)


def _sample_world_defaults() -> dict[str, Any]:
    try:
        from ..data import sample_world as sw
    except ImportError as error:
        raise ValueError("the bundled sample world is not available in this install; give --conversations, "
                         "--collection and --qrels") from error
    base = Path(sw.SAMPLE_WORLD_DIR)
    return {"conversations": str(base / sw.EVAL), "collection": str(base / sw.COLLECTION),
            "qrels": str(base / sw.QRELS), "contexts": [str(base / c) for c in sw.EVAL_CONTEXTS]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret evaluate",
        description="The whole retrieval chain from a checkpoint: encode the collection (cached per model), "
                    "exact inner-product search for every session, pytrec_eval metrics, a markdown table. With "
                    "no data options: the bundled sample world's evaluation set (after `convret train`).")
    p.add_argument("--model", required=True, help="checkpoint (e.g. runs/tiny/final)")
    p.add_argument("--conversations", help="evaluation sessions (default: the sample world's eval set)")
    p.add_argument("--collection", help="passages (default: the sample world's collection)")
    p.add_argument("--qrels", help="TREC qrels (default: the sample world's)")
    p.add_argument("--baseline", action="append", default=[], metavar="CKPT",
                   help="another checkpoint for a row of its own (e.g. runs/tiny/init, the untrained model); "
                        "repeatable")
    p.add_argument("--query-only", action="store_true", help="add the row: the model given only the current "
                                                             "utterance (no session)")
    p.add_argument("--rewrite", action="store_true", help="add the row: the model given the manual rewrite")
    p.add_argument("--contexts", nargs="*", default=None, metavar="FILE",
                   help="alternative-context versions of the eval turns: NDCG@3 mean and std across them "
                        "(default with the sample world: its eval_context_*.json)")
    p.add_argument("--output", default="runs/eval",
                   help="directory of the runs, results.json and the embedding cache (default runs/eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in --output of another model, data or setting (an error otherwise)")
    p.add_argument("--top_k", "--top-k", type=int, default=1000)
    p.add_argument("--rel_threshold", "--rel-threshold", type=int, default=1)
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    p.add_argument("--device", default=None)
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to run the model in (default: the saved dtype), e.g. bfloat16 for a 7B on a GPU")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float32",
                   help="dtype of the stored passage vectors (as convret encode --dtype)")
    from ..data.readers import COLLECTION_FORMATS, CONVERSATION_FORMATS

    p.add_argument("--format", default="auto", choices=["auto", *CONVERSATION_FORMATS], metavar="FORMAT",
                   help="format of --conversations / --contexts, passed to convret's readers (default: auto; "
                        f"{', '.join(CONVERSATION_FORMATS)})")
    p.add_argument("--collection-format", default="auto", choices=["auto", *COLLECTION_FORMATS], metavar="FORMAT",
                   help=f"format of --collection (default: auto; {', '.join(COLLECTION_FORMATS)})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="passages per embedding shard: the collection is encoded and indexed shard by shard")
    p.add_argument("--allow-unknown-qrels", action="store_true",
                   help="evaluate even when the qrels name queries the conversation file lacks")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        data = {"conversations": args.conversations, "collection": args.collection, "qrels": args.qrels,
                "contexts": args.contexts}
        if not (args.conversations and args.collection and args.qrels):
            if args.conversations or args.collection or args.qrels:
                raise ValueError("give all of --conversations, --collection and --qrels, or none (sample world)")
            defaults = _sample_world_defaults()
            data = {**defaults, "contexts": defaults["contexts"] if args.contexts is None else args.contexts}
        print(f"convret evaluate: writing the runs, results.json and the embedding cache to {args.output}",
              file=sys.stderr)
        result = evaluate_chain(args.model, data["conversations"], data["collection"], data["qrels"], args.output,
                                args.baseline, args.query_only, args.rewrite, data["contexts"] or (), args.top_k,
                                args.rel_threshold, args.token_budget, args.device, args.allow_unknown_qrels,
                                args.model_dtype, args.dtype, args.format, args.collection_format, args.shard_size,
                                args.overwrite, log=lambda message: print(f"convret evaluate: {message}",
                                                                          file=sys.stderr))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"convret evaluate: error: {error}", file=sys.stderr)
        return 1
    print(markdown_table(result))
    return 0
