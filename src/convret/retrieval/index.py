"""``convret index``: a faiss inner-product index over an embedding directory, built without holding the corpus.

A non-exact index (IVF, PQ, SQ, ...) is trained on a seeded sample of ``--train-sample`` vectors (default sized
to faiss's guidance for the factory, see :func:`default_train_sample`), then vectors are added shard by shard
from the memory-mapped embedding shards, in blocks: the process holds the index being built plus one block,
never a float32 copy of the whole corpus. ``--shard-size N`` writes the index as several index shards of at most
N vectors (each trained identically, each built, written and freed in turn), which ``convret search`` searches
one after the other and merges exactly.

Layout of ``INDEX/`` (written atomically: a temporary directory, then renamed)::

    index.faiss            the faiss index (CPU form) when there is one index shard, else
    index-00000.faiss ...  the index shards, in passage order
    ids.txt                one passage id per line: line i is the passage of global row i (the id-file
                           format of convret.retrieval.ids)
    meta.json              {"dim", "count", "factory", "metric": "inner_product", "model", "normalized",
                            "embeddings", "train_sample", "shards": [{"name", "count"}], "fingerprint"}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._args import parse
from .._io import atomic_directory
from ..provenance import check_output, comparable, read_record
from .embeddings import EmbeddingsError, find_duplicate_id, iter_shards, read_meta
from .ids import concatenate_ids, read_ids

__all__ = ["build_index", "load_index", "main", "gpu_count", "default_train_sample", "configure_search",
           "default_nprobe", "check_same_model", "read_index_meta", "index_fingerprint", "recorded_fingerprint",
           "DEFAULT_NPROBE", "DEFAULT_EF_SEARCH"]

# chosen from the recall-vs-time tables in docs/retrieval.md (recall@100 against Flat >= 0.95 on the sample
# world and the synthetic benchmark collections): nprobe = max(DEFAULT_NPROBE, nlist / 8), at most nlist
DEFAULT_NPROBE = 128
DEFAULT_EF_SEARCH = 256
ADD_BLOCK = 16384  # rows converted to float32 and added at once


def gpu_count() -> int:
    """GPUs usable by the installed faiss (0 with faiss-cpu)."""
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001  (a GPU build on a machine without a driver)
        return 0


def default_train_sample(factory: str, count: int) -> int:
    """Training vectors for ``factory`` following faiss's guidance: k-means wants 39 to 256 points per centroid
    (faiss subsamples above 256), so IVF nlist gets 64 x nlist; a product or scalar quantizer's 256-centroid
    codebooks get at least 256 x 64 = 16,384; anything else untrained 65,536. Capped at ``count``."""
    want = 0
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        want = 64 * int(ivf.group(1))
    if re.search(r"PQ\d|SQ\d|SQfp16|RQ|LSQ", factory):
        want = max(want, 16_384)
    return min(count, want or 65_536)


def default_nprobe(nlist: int) -> int:
    """The default IVF ``nprobe``: an eighth of the lists, at least 128, at most all of them (recall@100 0.98
    against Flat at nlist 1,024 on the synthetic benchmark; see docs/retrieval.md)."""
    return max(1, min(nlist, max(DEFAULT_NPROBE, nlist // 8)))


def configure_search(index: Any, nprobe: int | None = None, ef_search: int | None = DEFAULT_EF_SEARCH
                     ) -> dict[str, int]:
    """Set IVF ``nprobe`` (``None``: :func:`default_nprobe`; capped at nlist) and HNSW ``efSearch`` on ``index``
    where it has them (through pre-transforms and refinement wrappers). Returns what was set, e.g.
    ``{"nprobe": 64}``."""
    import faiss

    done: dict[str, int] = {}
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.nprobe = default_nprobe(ivf.nlist) if nprobe is None else max(1, min(int(nprobe), ivf.nlist))
        done["nprobe"] = int(ivf.nprobe)
    inner = faiss.downcast_index(index)
    while inner is not None and not hasattr(inner, "hnsw"):
        nested = getattr(inner, "index", None) or getattr(inner, "base_index", None)
        inner = faiss.downcast_index(nested) if nested is not None else None
    if inner is not None and ef_search is not None:
        inner.hnsw.efSearch = int(ef_search)
        done["ef_search"] = int(ef_search)
    return done


def _train_sample(embeddings: Path, meta: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """``n`` vectors sampled without replacement (seeded) from the memory-mapped shards, float32."""
    count = meta["count"]
    pick = np.sort(np.random.default_rng(seed).choice(count, n, replace=False)) if n < count else np.arange(count)
    out = np.empty((len(pick), meta["dim"]), dtype=np.float32)
    done = 0
    for start, _, vectors in iter_shards(embeddings, meta, ids=False):
        rows = pick[(pick >= start) & (pick < start + len(vectors))] - start
        out[done : done + len(rows)] = vectors[rows]
        done += len(rows)
    return out


def _blocks(embeddings: Path, meta: dict[str, Any], block: int = ADD_BLOCK):
    """``(first row, float32 block)`` over every shard, memory-mapped, at most ``block`` rows at once."""
    for start, _, vectors in iter_shards(embeddings, meta, ids=False):
        for a in range(0, len(vectors), block):
            yield start + a, np.ascontiguousarray(vectors[a : a + block], dtype=np.float32)


def index_fingerprint(embeddings: str | os.PathLike, meta: dict[str, Any], factory: str,
                      train_sample: int | None, seed: int, shard_size: int | None) -> dict[str, Any]:
    """What determines an index: the embeddings' own fingerprint (the checkpoint, input and settings that
    produced them; for embeddings written without one, their directory and count) and the build settings."""
    source = meta.get("fingerprint") or {"directory": str(Path(embeddings).resolve()), "count": meta.get("count"),
                                         "model": meta.get("model")}
    return {"embeddings": source, "factory": factory, "train_sample": train_sample, "seed": seed,
            "shard_size": shard_size}


def recorded_fingerprint(index_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint an existing index directory records (``None``: none, or not an index)."""
    return (read_record(Path(index_dir) / "meta.json") or {}).get("index_fingerprint")


def build_index(embeddings: str | os.PathLike, output: str | os.PathLike, factory: str = "Flat",
                train_sample: int | None = None, use_gpu: bool | None = None, overwrite: bool = False,
                seed: int = 0, shard_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Build an inner-product index of ``embeddings`` (passage embeddings) into ``output``; returns its
    metadata.

    An existing ``output`` built from the same embeddings with the same settings is rebuilt; one of other
    embeddings or settings (or not an index) is refused naming the difference, unless ``overwrite``
    (:mod:`convret.provenance`). Query embeddings are refused: their ids are query ids.

    Args:
        factory: a faiss ``index_factory`` string: ``"Flat"`` exact; ``"Flat"`` stores float32, ``"SQfp16"``
            float16, ``"SQ8"`` 8 bits per dimension, ``"IVF4096,PQ64"`` 64 bytes per vector, ``"HNSW32"``, ...
        train_sample: vectors sampled (without replacement, seeded) to train a non-exact index; default
            :func:`default_train_sample`.
        use_gpu: ignored for building (adding is memory-bound; the index is built on CPU); kept for callers.
        shard_size: write index shards of at most this many vectors (default: one index).
        progress: a tqdm bar in vectors added.
    """
    import faiss
    from tqdm.auto import tqdm

    del use_gpu
    embeddings = Path(embeddings)
    meta = read_meta(embeddings)
    count, dim = int(meta["count"]), int(meta["dim"])
    if meta.get("kind") == "queries":
        raise EmbeddingsError(f"{embeddings}: holds query embeddings (kind 'queries', encoded from "
                              f"{meta.get('source', 'a conversation file')}), not passages: index the collection's "
                              "embeddings (convret encode --collection FILE --output DIR), and search with these")
    if count == 0 or not meta["shards"]:
        raise EmbeddingsError(f"{embeddings}: no embeddings (empty collection or conversation file)")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    fingerprint = index_fingerprint(embeddings, meta, factory, train_sample, seed, shard_size)
    check_output(output, fingerprint, recorded_fingerprint(output), overwrite, "an index")
    duplicate = find_duplicate_id([embeddings / f"{s['name']}.ids" for s in meta["shards"]])
    if duplicate is not None:
        raise EmbeddingsError(f"{embeddings}: duplicate id {duplicate[0]!r} (rows {duplicate[1]} and {duplicate[2]}): "
                              "ids must be unique")
    try:
        empty = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build index_factory({dim}, {factory!r}): {error}") from error
    trained_on = 0
    if not empty.is_trained:
        trained_on = train_sample if train_sample is not None else default_train_sample(factory, count)
        trained_on = max(1, min(trained_on, count))
        sample = _train_sample(embeddings, meta, trained_on, seed)
        try:
            empty.train(sample)
        except RuntimeError as error:
            raise ValueError(f"training {factory!r} on {len(sample)} vectors failed: {error}") from error
        del sample
    size = shard_size or count
    bounds = [(a, min(a + size, count)) for a in range(0, count, size)]
    names = ["index.faiss"] if len(bounds) == 1 else [f"index-{s:05d}.faiss" for s in range(len(bounds))]
    info = {"dim": dim, "count": count, "factory": factory, "metric": "inner_product",
            "model": meta.get("model"), "normalized": meta.get("normalized"), "embeddings": str(embeddings),
            "train_sample": trained_on, "shards": [{"name": n, "count": b - a} for n, (a, b) in zip(names, bounds)],
            "fingerprint": meta.get("fingerprint"), "index_fingerprint": fingerprint}
    bar = tqdm(total=count, unit="vector", desc=f"index {factory}", disable=not progress)
    try:
        with atomic_directory(output, overwrite=True) as tmp:
            blocks = _blocks(embeddings, meta)
            pending: tuple[int, np.ndarray] | None = None
            for name, (a, b) in zip(names, bounds):
                index = faiss.clone_index(empty)
                flat = faiss.downcast_index(index)
                # a flat-codes index (Flat, SQfp16, SQ8) is filled in place: its code buffer sized once, so that
                # std::vector growth never holds the old and the new buffer (up to 2x the index) at once
                direct = isinstance(flat, faiss.IndexFlatCodes) and type(flat) is not faiss.IndexFlatCodes
                if direct:
                    flat.codes.resize((b - a) * flat.code_size)
                    buffer = faiss.rev_swig_ptr(flat.codes.data(), (b - a) * flat.code_size)
                    filled = 0
                while True:
                    if pending is None:
                        pending = next(blocks, None)
                        if pending is None:
                            break
                    start, block = pending
                    take = block[max(0, a - start) : max(0, b - start)]
                    if len(take) and direct:
                        codes = flat.sa_encode(take).reshape(-1)
                        buffer[filled : filled + len(codes)] = codes
                        filled += len(codes)
                        flat.ntotal = filled // flat.code_size
                        bar.update(len(take))
                    elif len(take):
                        index.add(take)
                        bar.update(len(take))
                    if start + len(block) > b:
                        break  # the rest of this block belongs to the next index shard
                    pending = None
                if index.ntotal != b - a:
                    raise EmbeddingsError(f"{embeddings}: index shard {name} got {index.ntotal} vectors, "
                                          f"expected {b - a}")
                faiss.write_index(index, str(tmp / name))
                del index
            written = concatenate_ids([embeddings / f"{shard['name']}.ids" for shard in meta["shards"]],
                                      tmp / "ids.txt")
            if written != count:
                raise EmbeddingsError(f"{embeddings}: its id files hold {written} ids for {count} vectors")
            (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    finally:
        bar.close()
    return info


def read_index_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of an index directory (cheap: nothing of the index is read)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path}: not an index directory written by `convret index` (no meta.json)")
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / 'meta.json'}: unreadable ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path / 'meta.json'}: not a JSON object")
    return meta


def load_index(path: str | os.PathLike, use_gpu: bool | None = None,
               log: Callable[[str], Any] | None = None) -> tuple[list[Any], list[str], dict[str, Any]]:
    """``(index shards, ids, meta)`` of an index directory (one shard for an index written whole).

    With faiss-gpu installed and GPUs visible (and ``use_gpu`` not False) every shard is spread over all
    visible GPUs (``index_cpu_to_all_gpus`` with sharding); otherwise the shards stay on CPU and ``log`` is
    told why."""
    import faiss

    path = Path(path)
    meta = read_index_meta(path)
    names = [s["name"] for s in meta.get("shards", [{"name": "index.faiss"}])]
    shards = []
    for name in names:
        try:
            shards.append(faiss.read_index(str(path / name)))
        except RuntimeError as error:
            raise ValueError(f"{path / name}: unreadable faiss index ({error})") from error
    ids = read_ids(path / "ids.txt")
    total = sum(s.ntotal for s in shards)
    if len(ids) != total:
        raise ValueError(f"{path}: ids.txt holds {len(ids)} ids for {total} vectors")
    gpus = gpu_count() if use_gpu is not False else 0
    if gpus:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        shards = [faiss.index_cpu_to_all_gpus(s, co=options) for s in shards]
        if log:
            log(f"searching on {gpus} GPU(s), every index shard split across them (faiss-gpu)")
    elif log and use_gpu is not False:
        log(f"searching on CPU ({faiss.omp_get_max_threads()} threads): {_why_cpu()}")
    return shards, ids, meta


def check_same_model(index_dir: str | os.PathLike, meta: dict[str, Any], identity: str | None, name: Any,
                     what: str, allow: bool = False, log: Callable[[str], Any] | None = None) -> None:
    """Refuse to score ``what`` (query vectors of checkpoint ``name`` whose content identity is ``identity``)
    against an index whose passages another checkpoint encoded: the scores would mean nothing. ``allow``: warn
    through ``log`` instead. Where either side records no identity (vectors written by another tool, an older
    convret), ``log`` is told the check could not be made.

    Raises:
        ValueError: naming both checkpoints and the fix.
    """
    indexed = (meta.get("fingerprint") or {}).get("checkpoint")
    if not comparable(indexed) or not comparable(identity):
        if log is not None:
            missing = f"{index_dir} (its passages)" if not comparable(indexed) else what
            log(f"cannot check that {what} and the passages of {index_dir} come from the same model: {missing} "
                "records no checkpoint identity")
        return
    if indexed == identity:
        return
    message = (f"{index_dir} holds passages encoded with checkpoint {meta.get('model')!r} (content identity "
               f"{indexed}) but {what} come from checkpoint {name!r} (content identity {identity}): scores between "
               "two models' vectors mean nothing. Encode the passages and the queries with one checkpoint (or pass "
               "--allow-model-mismatch if comparing two models' vectors is what you mean)")
    if not allow:
        raise ValueError(message)
    if log is not None:
        log(f"warning (--allow-model-mismatch): {message}")


def _why_cpu() -> str:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        try:
            import torch

            if torch.cuda.is_available():
                return f"{torch.cuda.device_count()} GPU(s) visible but faiss-gpu is not installed (faiss-cpu)"
        except ImportError:
            pass
        return "faiss-cpu installed, no GPU faiss"
    return "faiss-gpu installed but it sees no GPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret index",
        description="Build a faiss inner-product index over an embedding directory from `convret encode` "
                    "(all shards, all ranks, in shard order) without loading it whole: a non-exact index is "
                    "trained on a sample, then vectors are added block by block from the memory-mapped shards. "
                    "Built on CPU; `convret search` uses faiss-gpu on all GPUs when installed. Written atomically.")
    p.add_argument("--embeddings", required=True, help="embedding directory (convret encode --collection ...)")
    p.add_argument("--output", required=True, help="index directory to write")
    p.add_argument("--factory", default="Flat",
                   help='faiss index_factory string: "Flat" (exact, float32; default), "SQfp16" (exact scores on '
                        'float16 vectors), "SQ8", "IVF4096,Flat", "IVF4096,PQ64", "HNSW32", ...')
    p.add_argument("--train-sample", type=int, default=None,
                   help="vectors sampled to train a non-exact index (default: faiss's guidance, 64 x nlist for "
                        "IVF, at least 16384 for PQ/SQ codebooks, capped at the collection)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="write index shards of at most N vectors (default: one index); search merges them exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT built from other embeddings or settings (or not an index); "
                        "without it that is an error naming the difference")
    p.add_argument("--cpu", action="store_true", help="accepted for compatibility: building is always on CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        info = build_index(args.embeddings, args.output, args.factory, args.train_sample, overwrite=args.overwrite,
                           shard_size=args.shard_size, progress=not args.no_progress)
    except (ValueError, RuntimeError, OSError, EmbeddingsError) as error:
        print(f"convret index: error: {error}", file=sys.stderr)
        return 1
    shards = f" in {len(info['shards'])} index shards" if len(info["shards"]) > 1 else ""
    print(f"indexed {info['count']} vectors of dim {info['dim']} ({args.factory}){shards} into {args.output}",
          file=sys.stderr)
    return 0
