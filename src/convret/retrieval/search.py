"""``convret search``: top-k passages for every query embedding, written as a TREC run.

Index shards (``convret index --shard-size``) are searched one after the other and their candidates merged:
over Flat shards the run equals one Flat index's, ties included. IVF ``nprobe`` and HNSW ``efSearch`` are set
from ``--nprobe`` / ``--ef-search``. The run's rank starts at 1 and its score is the real inner product of query
and passage embeddings (cosine similarity for normalised models). Equal scores are ordered by docid (as
``write_run`` orders a run file), also at the top-k cut-off, so a run is reproducible.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._args import parse
from ..provenance import check_output
from . import _data
from .embeddings import EmbeddingsError, read_embeddings, read_meta
from .index import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, check_same_model, configure_search, load_index, read_index_meta

__all__ = ["search", "search_index", "id_ranks", "main"]

_TIE_MARGIN = 16  # extra candidates fetched so that ties at the cut-off are broken by index order


def search_index(index: Any, queries: np.ndarray, top_k: int, batch_size: int = 4096,
                 ids: list[str] | None = None, progress: bool = False, id_rank: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)`` ``[n, k]`` (k = min(top_k, ntotal)), score descending, ties by ascending ``ids``
    (docids) when given, else by ascending index. ``id_rank``: each row's position in the sorted ``ids``
    (:func:`id_ranks`), for a caller that searches many times over one index (sorting the ids once).

    ``index`` is a faiss index or a list of index shards (rows numbered consecutively, shard after shard, as
    ``convret index --shard-size`` writes them): every shard is searched for its top k + margin and the
    candidates are merged by (score, tie-break), so the result over Flat shards equals one Flat index's.
    Queries go in batches of ``batch_size`` (a tqdm bar with ``progress``)."""
    from tqdm.auto import tqdm

    shards = list(index) if isinstance(index, (list, tuple)) else [index]
    if not shards:
        raise ValueError("no index shards")
    dim = shards[0].d
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"query embeddings have dimension {queries.shape[-1]} but the index {dim}: "
                         "queries and passages were not encoded by the same model")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    offsets = np.cumsum([0] + [s.ntotal for s in shards])
    ntotal = int(offsets[-1])
    k = min(top_k, ntotal)
    all_scores, all_indices = [], []
    rank_of = id_rank if id_rank is not None else id_ranks(ids) if ids is not None else None
    with tqdm(total=len(queries), unit="query", desc="search", disable=not progress) as bar:
        for start in range(0, len(queries), batch_size):
            batch = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
            parts_s, parts_i = [], []
            for shard, offset in zip(shards, offsets[:-1]):
                if shard.ntotal == 0:
                    continue
                scores, indices = shard.search(batch, min(k + _TIE_MARGIN, shard.ntotal))
                parts_s.append(scores)
                parts_i.append(np.where(indices < 0, -1, indices + offset))
            scores, indices = np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1)
            # missing results (-1, e.g. IVF with too few probes) sort last
            scores = np.where(indices < 0, -np.inf, scores)
            if rank_of is not None:
                tie = np.where(indices < 0, len(rank_of), rank_of[np.maximum(indices, 0)])
            else:
                tie = np.where(indices < 0, np.iinfo(np.int64).max, indices)
            order = np.lexsort((tie, -scores), axis=1)[:, :k]
            all_scores.append(np.take_along_axis(scores, order, 1))
            all_indices.append(np.take_along_axis(indices, order, 1))
            bar.update(len(batch))
    return np.concatenate(all_scores), np.concatenate(all_indices)


def id_ranks(ids: Sequence[str]) -> np.ndarray:
    """Each id's position in ``sorted(ids)`` (the docid tie-break order)."""
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return ranks


def search(index_dir: str, queries_dir: str, top_k: int, output: str, tag: str = "convret",
           nprobe: int | None = None, ef_search: int | None = DEFAULT_EF_SEARCH, batch_size: int = 4096,
           use_gpu: bool | None = None, progress: bool = False, log: Callable[[str], Any] | None = None,
           overwrite: bool = False, allow_model_mismatch: bool = False) -> int:
    """Search ``queries_dir`` against ``index_dir``; write the run to ``output``. Returns the number of queries.

    Refused (``ValueError``): an existing ``output`` without ``overwrite`` (a run file records no provenance:
    :mod:`convret.provenance`); query embeddings of another checkpoint than the index's passages, unless
    ``allow_model_mismatch`` (:func:`~convret.retrieval.index.check_same_model`)."""
    check_output(output, {}, None, overwrite, "a run", "pass --overwrite to replace it, or another --output")
    qmeta = read_meta(queries_dir)
    index_meta = read_index_meta(index_dir)
    check_same_model(index_dir, index_meta, (qmeta.get("fingerprint") or {}).get("checkpoint"), qmeta.get("model"),
                     f"the query embeddings {queries_dir}", allow_model_mismatch, log)
    shards, doc_ids, meta = load_index(index_dir, use_gpu=use_gpu, log=log)
    _check_run_words(doc_ids, "docid", lambda row: f"{Path(index_dir) / 'ids.txt'}:{row + 1}")
    qids, queries, qmeta = read_embeddings(queries_dir, unique=True)
    _check_run_words(qids, "query id", lambda row: f"{queries_dir}: query {row + 1}")
    if queries.shape[1] != meta["dim"]:
        raise ValueError(f"{queries_dir}: query embeddings have dimension {queries.shape[1]} but {index_dir} "
                         f"holds dimension {meta['dim']}: queries and passages were not encoded by the same model")
    for shard in shards:
        configure_search(shard, nprobe, ef_search)
    scores, indices = search_index(shards, queries, top_k, batch_size, ids=doc_ids, progress=progress)
    results = {qid: [(doc_ids[j], float(s)) for s, j in zip(scores[q], indices[q]) if j >= 0]
               for q, qid in enumerate(qids)}
    _data.save_run(output, results, tag)
    return len(qids)


_WHITESPACE = re.compile(r"[^\S\n]")


def _check_run_words(ids: Sequence[str], what: str, where: Callable[[int], str]) -> None:
    """A TREC run is whitespace-separated: refuse an id it cannot hold before searching, not once the run is
    written (an id file holds such ids: ``convret serve`` and ``convret mine`` take them)."""
    text = "\n".join(ids)
    match = _WHITESPACE.search(text)  # whitespace but the separators (an id holds no \n)
    if match is not None:
        row = text.count("\n", 0, match.start())
        raise ValueError(f"{where(row)}: {what} {ids[row]!r} contains whitespace "
                         f"({match.group()!r}): a TREC run (whitespace-separated columns) cannot hold it; change "
                         "the id in the input, or use the Python API (search_index) or `convret serve`")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret search",
        description="Retrieve the top-k passages of every query embedding and write a TREC run "
                    "(qid Q0 docid rank score tag; rank from 1; score = the real inner product). Index shards "
                    "are searched in turn and merged exactly. faiss-gpu on all visible GPUs when installed, else "
                    "CPU. Written atomically.")
    p.add_argument("--index", required=True, help="index directory (convret index)")
    p.add_argument("--queries", required=True, help="query embedding directory (convret encode --conversations)")
    p.add_argument("--top_k", "--top-k", type=int, default=1000, help="passages per query (default 1000)")
    p.add_argument("--output", required=True, help="TREC run file to write")
    p.add_argument("--tag", default="convret", help="run tag (last column)")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"IVF indexes: inverted lists visited per query (default max({DEFAULT_NPROBE}, nlist / 8), "
                        "at most nlist; "
                        "see docs/retrieval.md for recall vs time)")
    p.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH,
                   help=f"HNSW indexes: search-time candidate list size (default {DEFAULT_EF_SEARCH}; raise it "
                        "with --top_k)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per faiss search call")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (a run file does not record which model wrote it, so it is "
                        "never replaced without this)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="search even when the queries were encoded by another checkpoint than the index's passages "
                        "(an error otherwise: the scores would mean nothing)")
    p.add_argument("--cpu", action="store_true", help="never use a GPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)

    def log(message: str) -> None:
        print(f"convret search: {message}", file=sys.stderr)

    try:
        n = search(args.index, args.queries, args.top_k, args.output, args.tag, args.nprobe, args.ef_search,
                   args.batch_size, use_gpu=False if args.cpu else None, progress=not args.no_progress, log=log,
                   overwrite=args.overwrite, allow_model_mismatch=args.allow_model_mismatch)
    except (ValueError, OSError, EmbeddingsError) as error:
        print(f"convret search: error: {error}", file=sys.stderr)
        return 1
    print(f"searched {n} queries, top {args.top_k}, run written to {args.output}", file=sys.stderr)
    return 0
