"""``convret index``: a faiss inner-product index over an embedding directory.

Layout of ``INDEX/`` (written atomically: a temporary directory, then renamed)::

    index.faiss   the faiss index (CPU form, whatever device built it)
    ids.txt       one passage id per line: line i is faiss id i
    meta.json     {"dim", "count", "factory", "metric": "inner_product", "model", "normalized", "embeddings"}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_directory
from .embeddings import EmbeddingsError, read_embeddings

__all__ = ["build_index", "load_index", "main", "gpu_count"]


def gpu_count() -> int:
    """GPUs usable by the installed faiss (0 with faiss-cpu)."""
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001  (a GPU build on a machine without a driver)
        return 0


def _to_gpus(index: Any) -> Any:
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def build_index(embeddings: str | os.PathLike, output: str | os.PathLike, factory: str = "Flat",
                train_sample: int | None = None, use_gpu: bool | None = None, overwrite: bool = True,
                seed: int = 0) -> dict[str, Any]:
    """Build an inner-product index of ``embeddings`` into ``output``; returns its metadata.

    Args:
        factory: a faiss ``index_factory`` string (``"Flat"`` exact; ``"IVF4096,PQ64"``, ``"HNSW32"``, ...).
        train_sample: vectors sampled (without replacement, seeded) to train a non-exact index; default all.
        use_gpu: build on all GPUs (sharded) when the GPU build of faiss sees any; default: when available.
    """
    import faiss

    ids, vectors, meta = read_embeddings(embeddings, unique=True)
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build index_factory({dim}, {factory!r}): {error}") from error
    gpus = gpu_count() if use_gpu in (None, True) else 0
    if use_gpu and not gpus:
        raise RuntimeError("use_gpu: the installed faiss sees no GPU (install faiss-gpu)")
    if not index.is_trained:
        sample = vectors
        if train_sample is not None and train_sample < len(vectors):
            pick = np.random.default_rng(seed).choice(len(vectors), train_sample, replace=False)
            sample = vectors[np.sort(pick)]
        try:
            index.train(np.ascontiguousarray(sample))
        except RuntimeError as error:
            raise ValueError(f"training {factory!r} on {len(sample)} vectors failed: {error}") from error
    work = _to_gpus(index) if gpus and factory.strip().lower() == "flat" else index
    work.add(np.ascontiguousarray(vectors))
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    info = {"dim": dim, "count": len(ids), "factory": factory, "metric": "inner_product",
            "model": meta.get("model"), "normalized": meta.get("normalized"), "embeddings": str(embeddings)}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def load_index(path: str | os.PathLike, use_gpu: bool | None = None) -> tuple[Any, list[str], dict[str, Any]]:
    """``(faiss index, ids, meta)`` of an index directory; on all GPUs (sharded) when available."""
    import faiss

    path = Path(path)
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path}: not an index directory written by `convret index` (no meta.json)")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as error:
        raise ValueError(f"{path / 'index.faiss'}: unreadable faiss index ({error})") from error
    ids = (path / "ids.txt").read_text(encoding="utf-8").splitlines()
    if len(ids) != index.ntotal:
        raise ValueError(f"{path}: ids.txt holds {len(ids)} ids for {index.ntotal} vectors")
    if gpu_count() and use_gpu in (None, True):
        index = _to_gpus(index)
    return index, ids, meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret index",
        description="Build a faiss inner-product index over an embedding directory from `convret encode` "
                    "(all shards, all ranks, merged in shard order). GPU faiss on all GPUs when installed and a "
                    "GPU is present, else CPU. Written atomically.")
    p.add_argument("--embeddings", required=True, help="embedding directory (convret encode --collection ...)")
    p.add_argument("--output", required=True, help="index directory to write")
    p.add_argument("--factory", default="Flat",
                   help='faiss index_factory string: "Flat" (exact, default), "IVF4096,PQ64", "HNSW32", ...')
    p.add_argument("--train-sample", type=int, default=None,
                   help="vectors sampled to train a non-exact index (default: all)")
    p.add_argument("--cpu", action="store_true", help="never use a GPU")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = build_index(args.embeddings, args.output, args.factory, args.train_sample,
                           use_gpu=False if args.cpu else None)
    except (ValueError, RuntimeError, OSError, EmbeddingsError) as error:
        print(f"convret index: error: {error}", file=sys.stderr)
        return 1
    print(f"indexed {info['count']} vectors of dim {info['dim']} ({args.factory}) into {args.output}",
          file=sys.stderr)
    return 0
