"""``convret encode``: embed a collection's passages or a conversation file's sessions into an embedding dir.

Streaming: the input is read record by record (``convret.data.read_collection`` / ``read_conversations``) and
cut into shards of ``--shard-size`` items in file order; only the shard being encoded is tokenised and held in
memory (token ids as int32 arrays), sorted and packed, embedded, written, freed. Memory is bounded by the shard
size, not the collection size.

Resumable: a shard already complete on disk is skipped without tokenising its records; a partial one is
rewritten. Every shard records the fingerprint of what produced it (checkpoint identity, input and its format,
query-only / rewrite, instructions, max lengths, dtypes, shard size); a directory holding shards of another
fingerprint is an error naming the difference, unless ``--overwrite``.

Several processes: under ``torchrun`` rank r encodes shards r, r + W, r + 2W, ... (W = world size) on its own
device; every rank reads the input (skipping others' records untokenised); rank 0 writes ``meta.json`` once all
are there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .._args import parse
from .._io import atomic_write
from ..data.records import EvalTurn, Passage
from ..provenance import content_identity
from . import _data
from .embeddings import (FORMAT_VERSION, META, EmbeddingsError, find_duplicate_id, fingerprint_difference,
                         read_meta, shard_complete, shard_fingerprints, shard_name, write_shard)
from .encoder import DEFAULT_TOKEN_BUDGET, Encoder
from .ids import check_id, id_problem

__all__ = ["encode_to_dir", "encode_stream", "encode_fingerprint", "checkpoint_identity", "collection_records",
           "conversation_records", "collection_items", "conversation_items", "main"]

DEFAULT_SHARD_SIZE = 50_000
OVERWRITE_FIX = "use another --output, or --overwrite to re-encode into it"
_ITEM = {"passages": "passage", "queries": "query"}  # a progress bar's unit, an error's noun


def collection_items(path: str | os.PathLike, encoder: Encoder, fmt: str = "auto") -> tuple[list[str], list[list[int]]]:
    """``(ids, token sequences)`` of a small collection, whole in memory (``convret encode`` streams instead:
    :func:`collection_records`). Raises ``ValueError`` on duplicate ids or an empty file."""
    ids: list[str] = []
    sequences: list[list[int]] = []
    for passage in _data.unique_passages(path, fmt):
        ids.append(passage.id)
        sequences.append(encoder.passage_tokens(passage))
    return ids, sequences


def conversation_items(path: str | os.PathLike, encoder: Encoder, query_only: bool = False,
                       query_field: str = "query", fmt: str = "auto") -> tuple[list[str], list[list[int]]]:
    """``(qids, token sequences)`` of a conversation file's sessions.

    Args:
        query_only: the current utterance alone, without the session (the "no context" baseline).
        query_field: ``"rewrite"`` embeds the manual rewrite alone (the field's oracle query).
    """
    ids: list[str] = []
    sequences: list[list[int]] = []
    for turn in _data.iter_conversations(path, fmt):
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


def checkpoint_identity(path: str | os.PathLike) -> str:
    """The content identity of a checkpoint (:func:`convret.provenance.content_identity`)."""
    return content_identity(path)


def _source_identity(source: str | os.PathLike | None) -> dict[str, Any]:
    if source is None:
        return {"source": None}
    path = Path(source)
    try:
        stat = path.stat()
    except OSError:
        return {"source": str(source)}
    return {"source": str(path.resolve()), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def encode_fingerprint(encoder: Encoder, kind: str, source: str | os.PathLike | None = None, fmt: str = "auto",
                       query_only: bool = False, query_field: str = "query", dtype: str = "float32",
                       shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """What determines the vectors of an embedding directory; stored in every shard and in ``meta.json``."""
    import torch

    config = encoder.config
    params = next(encoder.model.parameters(), None)
    queries = kind == "queries"
    return {
        "checkpoint": checkpoint_identity(encoder.source) if encoder.source else "in-memory",
        "kind": kind, **_source_identity(source), "format": fmt,
        "query_only": bool(query_only) if queries else None, "query_field": query_field if queries else None,
        "instruction": getattr(config, "instruction", None) if queries else None,
        "passage_instruction": None if queries else getattr(config, "passage_instruction", None),
        "max_session_len": getattr(config, "max_session_len", None) if queries else None,
        "max_passage_len": None if queries else getattr(config, "max_passage_len", None),
        "normalize": bool(config.normalize), "dtype": dtype,
        "model_dtype": str(params.dtype).replace("torch.", "") if isinstance(params, torch.Tensor) else None,
        "shard_size": shard_size,
    }


def collection_records(path: str | os.PathLike, encoder: Encoder, fmt: str = "auto"
                       ) -> tuple[Iterator[tuple[str, Passage]], Callable[[Passage], list[int]]]:
    """``(records, tokenize)``: the collection's ``(id, passage)`` streamed, and the passage tokenizer."""
    return ((p.id, p) for p in _data.iter_collection(path, fmt)), encoder.passage_tokens


def conversation_records(path: str | os.PathLike, encoder: Encoder, query_only: bool = False,
                         query_field: str = "query", fmt: str = "auto"
                         ) -> tuple[Iterator[tuple[str, EvalTurn]], Callable[[EvalTurn], list[int]]]:
    """``(records, tokenize)``: the sessions' ``(qid, turn)`` streamed, and the session tokenizer."""
    if query_field not in ("query", "rewrite"):
        raise ValueError(f"query_field must be 'query' or 'rewrite', got {query_field!r}")
    return (((t.qid, t) for t in _data.iter_conversations(path, fmt)),
            lambda turn: turn_tokens(encoder, turn, query_only, query_field, path))


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
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Encode in-memory ``(ids, token sequences)`` into ``output`` (see :func:`encode_stream`)."""
    fingerprint = encode_fingerprint(encoder, kind, None, dtype=dtype, shard_size=shard_size)
    return encode_stream(encoder, zip(ids, sequences), None, output, fingerprint, dtype, shard_size, kind, rank,
                         world_size, extra_meta, progress, finish, overwrite, total=len(ids))


def encode_stream(
    encoder: Encoder,
    records: Iterable[tuple[str, Any]],
    tokenize: Callable[[Any], Sequence[int]] | None,
    output: str | os.PathLike,
    fingerprint: dict[str, Any],
    dtype: str = "float32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    kind: str = "passages",
    rank: int = 0,
    world_size: int = 1,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    finish: bool = True,
    overwrite: bool = False,
    barrier: Callable[[], Any] | None = None,
    total: int | None = None,
    source: str = "",
    fix: str = OVERWRITE_FIX,
) -> dict[str, Any] | None:
    """Encode ``records`` (``(id, item)`` in order; ``tokenize(item)`` gives its token ids, or the item is
    its token ids when ``tokenize`` is None) into the embedding directory ``output``, one shard at a time.

    Shards complete on disk with the same ``fingerprint`` are kept (their records are skipped untokenised).
    Shards of another fingerprint: ``ValueError`` naming the difference, or with ``overwrite`` deleted first.
    ``barrier`` (torch.distributed's, under torchrun) synchronises ranks around the deletion and before rank 0
    writes ``meta.json``. ``fix``: what the error about another fingerprint tells the user to do (a command
    without ``--overwrite`` names its own remedy). A run that fails leaves no empty ``output`` directory behind
    (one it created). Returns the metadata written (by rank 0 with ``finish``), else ``None``.

    Raises:
        ValueError: no records, a duplicate id (naming both positions), an id an id file cannot hold
            (:mod:`convret.retrieval.ids`), shards of another fingerprint.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    output = Path(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        return _encode_stream(encoder, records, tokenize, output, fingerprint, dtype, shard_size, kind, rank,
                              world_size, extra_meta, progress, finish, overwrite, barrier, total, source, fix)
    except BaseException:
        if created and rank == 0:
            with contextlib.suppress(OSError):
                output.rmdir()  # only when empty: complete shards stay for the rerun
        raise


def _encode_stream(encoder: Encoder, records: Iterable[tuple[str, Any]], tokenize: Callable[[Any], Sequence[int]] | None,
                   output: Path, fingerprint: dict[str, Any], dtype: str, shard_size: int, kind: str, rank: int,
                   world_size: int, extra_meta: dict[str, Any] | None, progress: bool, finish: bool, overwrite: bool,
                   barrier: Callable[[], Any] | None, total: int | None, source: str, fix: str
                   ) -> dict[str, Any] | None:
    from tqdm.auto import tqdm

    if not overwrite:
        _check_foreign(output, fix)
    done = _finished_meta(output, fingerprint)
    if done is not None:
        return done if rank == 0 else None
    if overwrite:
        if rank == 0:
            _clear(output)
    else:
        _check_fingerprints(output, fingerprint, fix)
    if barrier is not None and world_size > 1:
        barrier()
    if rank == 0:
        (output / META).unlink(missing_ok=True)  # rewritten last, once every shard is there
    item = _ITEM.get(kind, kind)
    bar = tqdm(total=total, unit=item, disable=not progress, desc=f"encode{f' rank {rank}' if world_size > 1 else ''}")
    np_dtype = np.float16 if dtype == "float16" else np.float32
    count, kept = 0, 0
    shard, todo = -1, False
    shard_ids: list[str] = []
    shard_tokens: list[np.ndarray] = []
    seen: dict[str, int] = {}

    def flush() -> None:
        if todo and shard_ids:
            vectors = encoder.embed_tokens(shard_tokens, progress=bar.update)
            write_shard(output, shard, shard_ids, vectors.astype(np_dtype), fingerprint)

    try:
        for n, (ident, value) in enumerate(records):
            s = n // shard_size
            if s != shard:
                flush()
                shard, shard_ids, shard_tokens, seen = s, [], [], {}
                todo = s % world_size == rank and not shard_complete(output, s, fingerprint=fingerprint)
                kept += s % world_size == rank and not todo
                if kept and not todo and progress:
                    bar.set_postfix_str(f"{kept} shards kept", refresh=False)
            count = n + 1
            if not todo:
                continue
            if ident in seen:
                raise ValueError(f"{source or output}: duplicate {item} id {ident!r} ({kind} {seen[ident] + 1} "
                                 f"and {n + 1}): ids must be unique")
            if id_problem(ident) is not None:  # the readers name the line; in-memory records their position
                check_id(ident, f"{source or 'input'}: {item} {n + 1}")
            seen[ident] = n
            tokens = tokenize(value) if tokenize is not None else value
            shard_ids.append(ident)
            shard_tokens.append(np.asarray(tokens, dtype=np.int32))
        flush()
        shard_ids, shard_tokens = [], []
    finally:
        bar.close()
    if count == 0:
        what = "collection (no passages)" if kind == "passages" else f"input (no {kind})"
        raise ValueError(f"{source or 'input'}: empty {what}")
    if not finish:
        return None
    if barrier is not None and world_size > 1:
        barrier()
    bounds = [(a, min(a + shard_size, count)) for a in range(0, count, shard_size)]
    return _finish(output, encoder, bounds, dtype, kind, rank, extra_meta, fingerprint, source)


def _finished_meta(output: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The meta.json of a finished directory with this fingerprint whose shards are all there, else None."""
    try:
        meta = read_meta(output)
    except EmbeddingsError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    ok = all(shard_complete(output, int(sh["name"].split("-")[1]), sh["count"], fingerprint) for sh in meta["shards"])
    return meta if ok else None


def _clear(output: Path) -> None:
    for path in output.glob("part-*"):
        path.unlink(missing_ok=True)
    (output / META).unlink(missing_ok=True)


def _check_foreign(output: Path, fix: str) -> None:
    # shards, meta.json and their temporary files (".part-00000.npy.XYZ.tmp") are an embedding directory's
    foreign = sorted(p.name for p in output.iterdir()
                     if p.name != META and not p.name.startswith(("part-", ".part-", f".{META}.")))
    if foreign:
        raise ValueError(f"{output}: holds files that are not an embedding directory's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): not the output of convret encode; {fix}")


def _check_fingerprints(output: Path, fingerprint: dict[str, Any], fix: str = OVERWRITE_FIX) -> None:
    fingerprints = shard_fingerprints(output)
    for name, old in fingerprints.items():
        if old is not None and old != fingerprint:
            raise ValueError(f"{output}: holds shards of another encoding ({name}: "
                             f"{fingerprint_difference(old, fingerprint)}); {fix}")
    try:
        meta = read_meta(output)
    except EmbeddingsError:
        return
    if fingerprints and "fingerprint" not in meta:
        raise ValueError(f"{output}: written by an older convret without shard fingerprints (model "
                         f"{meta.get('model')!r}); {fix}")


def _finish(output: Path, encoder: Encoder, bounds: list[tuple[int, int]], dtype: str, kind: str, rank: int,
            extra_meta: dict[str, Any] | None, fingerprint: dict[str, Any] | None = None,
            source: str = "") -> dict[str, Any] | None:
    if rank != 0:
        return None
    missing = [shard_name(s) for s, (a, b) in enumerate(bounds)
               if not shard_complete(output, s, b - a, fingerprint)]
    if missing:
        raise RuntimeError(f"{output}: shards {missing[:5]} are not complete; every rank must finish "
                           "(run the same command again to complete them)")
    duplicate = find_duplicate_id([output / f"{shard_name(s)}.ids" for s in range(len(bounds))])
    if duplicate is not None:
        ident, first, second = duplicate
        item = _ITEM.get(kind, kind)
        raise ValueError(f"{source or output}: duplicate {item} id {ident!r} ({kind} {first + 1} and {second + 1}): "
                         "ids must be unique")
    meta = {
        "format_version": FORMAT_VERSION, "model": encoder.source, "dim": encoder.dim, "dtype": dtype,
        "normalized": bool(encoder.config.normalize), "count": bounds[-1][1], "kind": kind,
        "shards": [{"name": shard_name(s), "count": b - a} for s, (a, b) in enumerate(bounds)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprint": fingerprint,
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
                    "(the last summary token's final hidden state; formatting exactly as in training). Streams "
                    "the input shard by shard (memory bounded by --shard-size, not the collection). Writes "
                    "DIR/meta.json and shards DIR/part-NNNNN.{npy,ids,json}. Rerun after an interruption: "
                    "complete shards are kept. A directory holding another model's (or input's, dtype's, ...) "
                    "shards is an error unless --overwrite. Under torchrun (torchrun --nproc_per_node N -m "
                    "convret encode ...) every rank encodes its own shards.")
    p.add_argument("--model", required=True, help="checkpoint directory (OUTPUT_DIR/final of convret train)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--collection", help="passages: jsonl {id,text,title?}, Tevatron corpus or TSV pid<TAB>text")
    src.add_argument("--conversations", help="evaluation sessions: ChatRetriever eval JSON, QReCC, TopiOCQA, CAsT")
    from ..data.readers import COLLECTION_FORMATS, CONVERSATION_FORMATS

    p.add_argument("--format", default="auto", choices=["auto", *dict.fromkeys((*COLLECTION_FORMATS,
                                                                               *CONVERSATION_FORMATS))],
                   metavar="FORMAT",
                   help="input format passed to convret's readers (default: auto, detected from the first record). "
                        f"Collections: {', '.join(COLLECTION_FORMATS)}; conversations: "
                        f"{', '.join(CONVERSATION_FORMATS)}")
    p.add_argument("--output", required=True, help="embedding directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="re-encode when the directory holds shards of another model / input / setting")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float32", help="dtype of the stored vectors")
    p.add_argument("--query-only", action="store_true",
                   help="sessions: the current utterance alone, without the earlier turns")
    p.add_argument("--query-field", choices=["query", "rewrite"], default="query",
                   help="sessions: the utterance in its session (query) or the manual rewrite alone (rewrite)")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="tokens packed into one forward pass (memory grows linearly with it)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"items per shard (default {DEFAULT_SHARD_SIZE}); the unit of memory, resumption and "
                        "of the split across ranks")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when present, else cpu)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to run the model in (default: the saved dtype)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    rank, world, dist = _dist()
    started = time.perf_counter()
    try:
        if args.collection:  # the input is checked before the model is loaded (minutes for a 7B)
            _data.check_input(args.collection, args.format, "collection")
        else:
            _data.check_input(args.conversations, args.format, "conversations")
        encoder = Encoder.from_checkpoint(args.model, device=args.device, token_budget=args.token_budget,
                                          dtype=args.model_dtype)
        if args.collection:
            records, tokenize = collection_records(args.collection, encoder, args.format)
            kind, source = "passages", args.collection
        else:
            records, tokenize = conversation_records(args.conversations, encoder, args.query_only, args.query_field,
                                                     args.format)
            kind, source = "queries", args.conversations
        fingerprint = encode_fingerprint(encoder, kind, source, args.format, args.query_only, args.query_field,
                                         args.dtype, args.shard_size)
        extra = {"source": str(source), "query_only": args.query_only, "query_field": args.query_field}
        meta = encode_stream(encoder, records, tokenize, args.output, fingerprint, args.dtype, args.shard_size, kind,
                             rank, world, extra, progress=not args.no_progress, overwrite=args.overwrite,
                             barrier=dist.barrier if dist is not None else None, source=str(source))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"convret encode: error{f' (rank {rank})' if world > 1 else ''}: {error}", file=sys.stderr)
        return 1
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and meta is not None:
        elapsed = time.perf_counter() - started
        print(f"encoded {meta['count']} {kind} into {args.output} ({elapsed:.1f} s)", file=sys.stderr)
    return 0
