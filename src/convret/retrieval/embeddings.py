"""The embedding directory written by ``convret encode`` and read by ``convret index`` / ``convret search``.

Layout of ``DIR/``::

    meta.json          {"model", "dim", "dtype", "normalized", "count", "kind", "shards": [{"name", "count"}], ...}
    part-00000.npy     float16 / float32 [n, dim], row i is the embedding of line i of part-00000.ids
    part-00000.ids     one id per line, UTF-8, each line ended by \n (the format of convret.retrieval.ids)
    part-00000.json    {"count": n, "fingerprint": {...}}: what produced the shard (checkpoint identity, ...)
    part-00001.npy ...

Each shard file is written under a temporary name and renamed, ``.ids`` first, then ``.npy``, then ``.json``:
a shard whose ``.json`` exists (and whose counts agree) is complete. ``meta.json`` is written last, when every
shard is there; a directory without it
is unfinished (``convret encode`` run again completes it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._io import atomic_write
from ..provenance import fingerprint_difference
from .ids import IdFileError, count_ids, iter_ids, read_ids, write_ids

__all__ = ["META", "write_embeddings", "shard_name", "write_shard", "read_shard", "shard_complete", "read_meta",
           "read_embeddings", "EmbeddingsError", "iter_shards", "find_duplicate_id", "shard_fingerprints",
           "fingerprint_difference"]

META = "meta.json"
FORMAT_VERSION = 1


class EmbeddingsError(ValueError):
    """An embedding directory or shard that cannot be used (names the file)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def write_shard(directory: Path, index: int, ids: Sequence[str], vectors: np.ndarray,
                fingerprint: dict[str, Any] | None = None, where: Callable[[int], str] | None = None) -> None:
    """Write shard ``index`` atomically (ids, then vectors, then ``part-N.json`` with its ``fingerprint``).
    An id an id file cannot hold (:mod:`convret.retrieval.ids`) is an error naming ``where(i)``, where the
    shard's i-th id came from."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    name = shard_name(index)
    write_ids(directory / f"{name}.ids", ids, where)
    with atomic_write(directory / f"{name}.npy", "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors), allow_pickle=False)
    with atomic_write(directory / f"{name}.json") as handle:
        json.dump({"count": len(ids), "fingerprint": fingerprint or {}}, handle)
        handle.write("\n")


def _shard_record(directory: Path, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def shard_complete(directory: Path, index: int, count: int | None = None,
                   fingerprint: dict[str, Any] | None = None) -> bool:
    """Shard ``index`` is complete: its ``.json`` record is there (with ``fingerprint`` when given) and ``.npy``
    and ``.ids`` hold its ``count`` rows (``count`` when given). Cheap: reads the .npy header only."""
    name = shard_name(index)
    npy, ids = directory / f"{name}.npy", directory / f"{name}.ids"
    record = _shard_record(directory, name)
    if record is None or not (npy.is_file() and ids.is_file()):
        return False
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return False
    try:
        rows = np.load(npy, mmap_mode="r").shape[0]
        lines = count_ids(ids)
    except (OSError, ValueError):
        return False
    return rows == lines == record.get("count") and (count is None or rows == count)


def shard_fingerprints(directory: Path) -> dict[str, dict[str, Any] | None]:
    """``{shard name: fingerprint}`` of every shard file in ``directory`` (``None``: a shard without a record,
    written by an older convret or cut short before its record)."""
    names = sorted({p.name.split(".")[0] for p in directory.glob("part-*.npy")} |
                   {p.name.split(".")[0] for p in directory.glob("part-*.json")})
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        record = _shard_record(directory, name)
        out[name] = None if record is None else record.get("fingerprint")
    return out


def read_shard(directory: Path, name: str, dim: int | None = None, mmap: bool = False) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors)`` of one shard; ``mmap``: the vectors memory-mapped read-only (in their stored dtype)."""
    npy, ids_path = directory / f"{name}.npy", directory / f"{name}.ids"
    try:
        vectors = np.load(npy, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        raise EmbeddingsError(f"{npy}: unreadable embedding shard ({error}); re-run `convret encode`") from error
    try:
        ids = read_ids(ids_path)
    except IdFileError as error:
        raise EmbeddingsError(str(error)) from error
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise EmbeddingsError(f"{npy}: shape {vectors.shape}, expected [n, {dim}]")
    if len(ids) != vectors.shape[0]:
        raise EmbeddingsError(f"{ids_path}: {len(ids)} ids for {vectors.shape[0]} vectors in {npy.name}")
    return ids, vectors


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META
    if not path.is_file():
        raise EmbeddingsError(f"{directory}: no {META}: not an embedding directory written by `convret encode`, "
                              "or its encoding did not finish (run it again to complete it)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise EmbeddingsError(f"{path}: unreadable ({error})") from error
    for key in ("dim", "count", "shards"):
        if key not in meta:
            raise EmbeddingsError(f"{path}: missing key {key!r}")
    return meta


def iter_shards(directory: str | os.PathLike, meta: dict[str, Any] | None = None, ids: bool = True
                ) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """``(first row, ids, memory-mapped vectors)`` of every shard in order, checked against ``meta.json``: the
    corpus is never in memory whole. With ``ids=False`` the id list is empty (the file is not read)."""
    directory = Path(directory)
    meta = meta or read_meta(directory)
    start = 0
    for shard in meta["shards"]:
        if ids:
            shard_ids, vectors = read_shard(directory, shard["name"], meta["dim"], mmap=True)
        else:
            npy = directory / f"{shard['name']}.npy"
            try:
                vectors = np.load(npy, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError, EOFError) as error:
                raise EmbeddingsError(f"{npy}: unreadable embedding shard ({error}); re-run `convret encode`"
                                      ) from error
            if vectors.ndim != 2 or vectors.shape[1] != meta["dim"]:
                raise EmbeddingsError(f"{npy}: shape {vectors.shape}, expected [n, {meta['dim']}]")
            shard_ids = []
        if len(vectors) != shard["count"]:
            raise EmbeddingsError(f"{directory / shard['name']}.npy: {len(vectors)} rows, meta.json says "
                                  f"{shard['count']}")
        yield start, shard_ids, vectors
        start += len(vectors)


def _iter_id_files(paths: Sequence[Path]) -> Iterator[str]:
    try:
        for path in paths:
            yield from iter_ids(path)
    except IdFileError as error:
        raise EmbeddingsError(str(error)) from error


def find_duplicate_id(paths: Sequence[Path]) -> tuple[str, int, int] | None:
    """The first duplicated id across the id files ``paths`` (one id per line, read in order) as
    ``(id, first position, second position)`` (0-based over all files), else ``None``.

    Memory is 16 bytes per id (a 64-bit hash and a position), not the ids themselves: MS MARCO's 8.8 M ids cost
    about 140 MB. Candidates whose hashes collide are confirmed by a second pass over the files."""
    import zlib

    def h(text: str) -> int:
        data = text.encode("utf-8")
        return (zlib.crc32(data) << 32) | zlib.adler32(data)  # stable across processes, unlike hash()

    chunks: list[np.ndarray] = []
    block: list[int] = []
    for text in _iter_id_files(paths):
        block.append(h(text))
        if len(block) == 1 << 16:
            chunks.append(np.array(block, dtype=np.uint64))
            block = []
    chunks.append(np.array(block, dtype=np.uint64))
    hashes = np.concatenate(chunks)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not len(same):
        return None
    suspects = set(sorted_hashes[same].tolist())
    first: dict[str, int] = {}
    for position, text in enumerate(_iter_id_files(paths)):
        if int(hashes[position]) in suspects:
            if text in first:
                return text, first[text], position
            first[text] = position
    return None


def read_embeddings(directory: str | os.PathLike, unique: bool = False) -> tuple[list[str], np.ndarray, dict]:
    """All shards of ``directory`` in index order: ``(ids, float32 [count, dim], meta)``.

    Raises :class:`EmbeddingsError` naming the file on a missing or unreadable shard, counts that disagree with
    ``meta.json``, an empty directory, and (with ``unique``) duplicate ids."""
    directory = Path(directory)
    meta = read_meta(directory)
    all_ids: list[str] = []
    parts = []
    for shard in meta["shards"]:
        ids, vectors = read_shard(directory, shard["name"], meta["dim"])
        if len(ids) != shard["count"]:
            raise EmbeddingsError(f"{directory / shard['name']}.npy: {len(ids)} rows, meta.json says {shard['count']}")
        all_ids.extend(ids)
        parts.append(vectors.astype(np.float32, copy=False))
    if not all_ids:
        raise EmbeddingsError(f"{directory}: no embeddings (empty collection or conversation file)")
    if unique and len(set(all_ids)) != len(all_ids):
        seen: set[str] = set()
        dup = next(i for i in all_ids if i in seen or seen.add(i))
        raise EmbeddingsError(f"{directory}: duplicate id {dup!r}: ids must be unique")
    return all_ids, np.concatenate(parts), meta


def write_embeddings(directory: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray, shard_size: int = 50_000,
                     **meta: Any) -> dict[str, Any]:
    """Write ``vectors`` (``[n, dim]``) and their ids as a complete embedding directory (any source: convret
    encode uses the same shards). Extra keyword arguments go into ``meta.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META).unlink(missing_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(ids), shard_size)):
        write_shard(directory, s, ids[start : start + shard_size], vectors[start : start + shard_size],
                    where=lambda i, start=start: f"ids[{start + i}]")
        shards.append({"name": shard_name(s), "count": len(ids[start : start + shard_size])})
    info = {"format_version": FORMAT_VERSION, "dim": int(vectors.shape[1]), "dtype": str(vectors.dtype),
            "count": len(ids), "shards": shards, "normalized": False, "model": None}
    info.update(meta)
    with atomic_write(directory / META) as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    return info
