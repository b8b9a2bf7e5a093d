"""The embedding directory written by ``convret encode`` and read by ``convret index`` / ``convret search``.

Layout of ``DIR/``::

    meta.json          {"model", "dim", "dtype", "normalized", "count", "kind", "shards": [{"name", "count"}], ...}
    part-00000.npy     float16 / float32 [n, dim], row i is the embedding of line i of part-00000.ids
    part-00000.ids     one id per line, UTF-8
    part-00001.npy ...

Each shard file is written under a temporary name and renamed, ``.ids`` first, then ``.npy``: a shard whose
``.npy`` exists is complete. ``meta.json`` is written last, when every shard is there; a directory without it
is unfinished (``convret encode`` run again completes it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import atomic_write

__all__ = ["META", "write_embeddings", "shard_name", "write_shard", "read_shard", "shard_complete", "read_meta", "read_embeddings",
           "EmbeddingsError"]

META = "meta.json"
FORMAT_VERSION = 1


class EmbeddingsError(ValueError):
    """An embedding directory or shard that cannot be used (names the file)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def write_shard(directory: Path, index: int, ids: Sequence[str], vectors: np.ndarray) -> None:
    """Write shard ``index`` atomically (ids, then vectors)."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    name = shard_name(index)
    for i in ids:
        if "\n" in i or "\r" in i:
            raise ValueError(f"id {i!r} contains a line break")
    with atomic_write(directory / f"{name}.ids") as handle:
        handle.write("".join(f"{i}\n" for i in ids))
    with atomic_write(directory / f"{name}.npy", "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors), allow_pickle=False)


def shard_complete(directory: Path, index: int, count: int) -> bool:
    """Shard ``index`` holds exactly ``count`` rows and ids (cheap: reads the .npy header only)."""
    name = shard_name(index)
    npy, ids = directory / f"{name}.npy", directory / f"{name}.ids"
    if not (npy.is_file() and ids.is_file()):
        return False
    try:
        rows = np.load(npy, mmap_mode="r").shape[0]
        lines = ids.read_text(encoding="utf-8").count("\n")
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return rows == count == lines


def read_shard(directory: Path, name: str, dim: int | None = None) -> tuple[list[str], np.ndarray]:
    npy, ids_path = directory / f"{name}.npy", directory / f"{name}.ids"
    try:
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise EmbeddingsError(f"{npy}: unreadable embedding shard ({error}); re-run `convret encode`") from error
    try:
        ids = ids_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EmbeddingsError(f"{ids_path}: unreadable id file ({error})") from error
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
        write_shard(directory, s, ids[start : start + shard_size], vectors[start : start + shard_size])
        shards.append({"name": shard_name(s), "count": len(ids[start : start + shard_size])})
    info = {"format_version": FORMAT_VERSION, "dim": int(vectors.shape[1]), "dtype": str(vectors.dtype),
            "count": len(ids), "shards": shards, "normalized": False, "model": None}
    info.update(meta)
    with atomic_write(directory / META) as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    return info
