"""``convret encode``: embed a collection's passages or a conversation file's sessions into an embedding dir.

Resumable and multi-process: the input is cut into shards of ``--shard-size`` items in file order; a shard
already complete on disk is skipped, a partial one rewritten. Under ``torchrun`` rank r encodes shards
r, r + W, r + 2W, ... (W = world size) on its own device; rank 0 writes ``meta.json`` once all are there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._io import atomic_write
from ..data.records import EvalTurn, Passage
from . import _data
from .embeddings import FORMAT_VERSION, META, shard_complete, shard_name, write_shard
from .encoder import DEFAULT_TOKEN_BUDGET, Encoder

__all__ = ["encode_to_dir", "collection_items", "conversation_items", "main"]

DEFAULT_SHARD_SIZE = 50_000


def collection_items(path: str | os.PathLike, encoder: Encoder) -> tuple[list[str], list[list[int]]]:
    """``(ids, token sequences)`` of a collection. Raises ``ValueError`` on duplicate ids or an empty file."""
    ids: list[str] = []
    sequences: list[list[int]] = []
    seen: dict[str, int] = {}
    for n, passage in enumerate(_data.iter_collection(path)):
        if passage.id in seen:
            raise ValueError(f"{path}: duplicate passage id {passage.id!r} (passages {seen[passage.id] + 1} and "
                             f"{n + 1}): ids must be unique")
        seen[passage.id] = n
        ids.append(passage.id)
        sequences.append(encoder.passage_tokens(passage))
    if not ids:
        raise ValueError(f"{path}: empty collection (no passages)")
    return ids, sequences


def conversation_items(path: str | os.PathLike, encoder: Encoder, query_only: bool = False,
                       query_field: str = "query") -> tuple[list[str], list[list[int]]]:
    """``(qids, token sequences)`` of a conversation file's sessions.

    Args:
        query_only: the current utterance alone, without the session (the "no context" baseline).
        query_field: ``"rewrite"`` embeds the manual rewrite alone (the field's oracle query).
    """
    ids: list[str] = []
    sequences: list[list[int]] = []
    for turn in _data.iter_conversations(path):
        ids.append(turn.qid)
        sequences.append(turn_tokens(encoder, turn, query_only, query_field, path))
    if not ids:
        raise ValueError(f"{path}: no evaluation turns")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate query id {dup!r}")
    return ids, sequences


def turn_tokens(encoder: Encoder, turn: EvalTurn, query_only: bool, query_field: str, path: Any = "") -> list[int]:
    if query_field == "rewrite":
        if not turn.rewrite:
            raise ValueError(f"{path}: turn {turn.qid} has no manual rewrite (--query-field rewrite)")
        return encoder.session_tokens([], turn.rewrite)
    if query_field != "query":
        raise ValueError(f"query_field must be 'query' or 'rewrite', got {query_field!r}")
    return encoder.session_tokens([] if query_only else turn.history, turn.query)


def _dist() -> tuple[int, int, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, dist


def encode_to_dir(
    encoder: Encoder,
    ids: Sequence[str],
    sequences: Sequence[Sequence[int]],
    output: str | os.PathLike,
    dtype: str = "float32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    kind: str = "passages",
    rank: int = 0,
    world_size: int = 1,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    finish: bool = True,
) -> dict[str, Any] | None:
    """Encode ``sequences`` into the embedding directory ``output``; shards already complete are kept.

    Returns the metadata written (by the process that writes ``meta.json``: rank 0 once every shard is there),
    else ``None``."""
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if not ids:
        raise ValueError("nothing to encode")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (output / META).unlink(missing_ok=True)  # rewritten last, once every shard is there
    bounds = [(start, min(start + shard_size, len(ids))) for start in range(0, len(ids), shard_size)]
    mine = [s for s in range(len(bounds)) if s % world_size == rank]
    todo = [s for s in mine if not shard_complete(output, s, bounds[s][1] - bounds[s][0])]
    total = sum(bounds[s][1] - bounds[s][0] for s in todo)
    kept = len(mine) - len(todo)
    bar = tqdm(total=total, unit=kind[:-1] if kind.endswith("s") else kind, disable=not progress,
               desc=f"encode{f' rank {rank}' if world_size > 1 else ''}" + (f" ({kept} shards kept)" if kept else ""))
    np_dtype = np.float16 if dtype == "float16" else np.float32
    try:
        for s in todo:
            start, end = bounds[s]
            vectors = encoder.embed_tokens(sequences[start:end], progress=bar.update)
            write_shard(output, s, list(ids[start:end]), vectors.astype(np_dtype))
    finally:
        bar.close()
    return _finish(output, encoder, bounds, dtype, kind, rank, extra_meta) if finish else None


def _finish(output: Path, encoder: Encoder, bounds: list[tuple[int, int]], dtype: str, kind: str, rank: int,
            extra_meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if rank != 0:
        return None
    missing = [shard_name(s) for s, (a, b) in enumerate(bounds) if not shard_complete(output, s, b - a)]
    if missing:
        raise RuntimeError(f"{output}: shards {missing[:5]} are not complete; every rank must finish "
                           "(run the same command again to complete them)")
    meta = {
        "format_version": FORMAT_VERSION, "model": encoder.source, "dim": encoder.dim, "dtype": dtype,
        "normalized": bool(encoder.config.normalize), "count": bounds[-1][1], "kind": kind,
        "shards": [{"name": shard_name(s), "count": b - a} for s, (a, b) in enumerate(bounds)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.update(extra_meta or {})
    with atomic_write(output / META) as handle:
        json.dump(meta, handle, indent=2)
        handle.write("\n")
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret encode",
        description="Embed a collection's passages or a conversation file's sessions with a convret checkpoint "
                    "(the last summary token's final hidden state; formatting exactly as in training). Writes "
                    "DIR/meta.json and shards DIR/part-NNNNN.npy [n, dim] + DIR/part-NNNNN.ids. Rerun after an "
                    "interruption: complete shards are kept. Under torchrun every rank encodes its own shards.")
    p.add_argument("--model", required=True, help="checkpoint directory (OUTPUT_DIR/final of convret train)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--collection", help="passages: jsonl {id,text,title?}, Tevatron corpus or TSV pid<TAB>text")
    src.add_argument("--conversations", help="evaluation sessions: ChatRetriever eval JSON, QReCC, TopiOCQA, CAsT")
    p.add_argument("--output", required=True, help="embedding directory to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float32", help="dtype of the stored vectors")
    p.add_argument("--query-only", action="store_true",
                   help="sessions: the current utterance alone, without the earlier turns")
    p.add_argument("--query-field", choices=["query", "rewrite"], default="query",
                   help="sessions: the utterance in its session (query) or the manual rewrite alone (rewrite)")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="tokens packed into one forward pass (memory grows linearly with it)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="items per shard")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when present, else cpu)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to run the model in (default: the saved dtype)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    import torch

    args = build_parser().parse_args(argv)
    rank, world, dist = _dist()
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        encoder = Encoder.from_checkpoint(args.model, device=device, token_budget=args.token_budget,
                                          dtype=getattr(torch, args.model_dtype) if args.model_dtype else None)
        if args.collection:
            ids, sequences = collection_items(args.collection, encoder)
            kind, source = "passages", args.collection
        else:
            ids, sequences = conversation_items(args.conversations, encoder, args.query_only, args.query_field)
            kind, source = "queries", args.conversations
        started = time.perf_counter()
        extra = {"source": str(source), "query_only": args.query_only, "query_field": args.query_field}
        encode_to_dir(encoder, ids, sequences, args.output, args.dtype, args.shard_size, kind, rank, world, extra,
                      progress=not args.no_progress, finish=dist is None)
        if dist is not None:
            dist.barrier()
            bounds = [(a, min(a + args.shard_size, len(ids))) for a in range(0, len(ids), args.shard_size)]
            _finish(Path(args.output), encoder, bounds, args.dtype, kind, rank, extra)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"convret encode: error: {error}", file=sys.stderr)
        return 1
    if rank == 0:
        elapsed = time.perf_counter() - started
        print(f"encoded {len(ids)} {kind} into {args.output} ({elapsed:.1f} s)", file=sys.stderr)
    return 0
