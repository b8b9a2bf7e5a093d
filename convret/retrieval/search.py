"""``convret search``: top-k passages for every query embedding, written as a TREC run.

The run's rank starts at 1 and its score is the real inner product of query and passage embeddings (cosine
similarity for normalised models). Equal scores are ordered by docid (as ``write_run`` orders a run file),
also at the top-k cut-off, so a run is reproducible.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from . import _data
from .embeddings import EmbeddingsError, read_embeddings
from .index import load_index

__all__ = ["search", "search_index", "main"]

_TIE_MARGIN = 16  # extra candidates fetched so that ties at the cut-off are broken by index order


def search_index(index: Any, queries: np.ndarray, top_k: int, batch_size: int = 4096,
                 ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)`` ``[n, k]`` (k = min(top_k, ntotal)), score descending, ties by ascending ``ids``
    (docids) when given, else by ascending index."""
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"query embeddings have dimension {queries.shape[-1]} but the index {index.d}: "
                         "queries and passages were not encoded by the same model")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    k = min(top_k, index.ntotal)
    fetch = min(k + _TIE_MARGIN, index.ntotal)
    all_scores, all_indices = [], []
    rank_of = _id_ranks(ids) if ids is not None else None
    for start in range(0, len(queries), batch_size):
        scores, indices = index.search(np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32),
                                       fetch)
        # missing results (-1, e.g. IVF with too few probes) sort last
        scores = np.where(indices < 0, -np.inf, scores)
        if rank_of is not None:
            tie = np.where(indices < 0, len(ids), rank_of[np.maximum(indices, 0)])
        else:
            tie = np.where(indices < 0, np.iinfo(np.int64).max, indices)
        order = np.lexsort((tie, -scores), axis=1)[:, :k]
        all_scores.append(np.take_along_axis(scores, order, 1))
        all_indices.append(np.take_along_axis(indices, order, 1))
    return np.concatenate(all_scores), np.concatenate(all_indices)


def _id_ranks(ids: list[str]) -> np.ndarray:
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return ranks


def search(index_dir: str, queries_dir: str, top_k: int, output: str, tag: str = "convret") -> int:
    """Search ``queries_dir`` against ``index_dir``; write the run to ``output``. Returns the number of queries."""
    index, doc_ids, meta = load_index(index_dir)
    qids, queries, qmeta = read_embeddings(queries_dir, unique=True)
    if queries.shape[1] != meta["dim"]:
        raise ValueError(f"{queries_dir}: query embeddings have dimension {queries.shape[1]} but {index_dir} "
                         f"holds dimension {meta['dim']}: queries and passages were not encoded by the same model")
    scores, indices = search_index(index, queries, top_k, ids=doc_ids)
    results = {qid: [(doc_ids[j], float(s)) for s, j in zip(scores[q], indices[q]) if j >= 0]
               for q, qid in enumerate(qids)}
    _data.save_run(output, results, tag)
    return len(qids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret search",
        description="Retrieve the top-k passages of every query embedding and write a TREC run "
                    "(qid Q0 docid rank score tag; rank from 1; score = the real inner product). Written atomically.")
    p.add_argument("--index", required=True, help="index directory (convret index)")
    p.add_argument("--queries", required=True, help="query embedding directory (convret encode --conversations)")
    p.add_argument("--top_k", "--top-k", type=int, default=1000, help="passages per query (default 1000)")
    p.add_argument("--output", required=True, help="TREC run file to write")
    p.add_argument("--tag", default="convret", help="run tag (last column)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        n = search(args.index, args.queries, args.top_k, args.output, args.tag)
    except (ValueError, OSError, EmbeddingsError) as error:
        print(f"convret search: error: {error}", file=sys.stderr)
        return 1
    print(f"searched {n} queries, top {args.top_k}, run written to {args.output}", file=sys.stderr)
    return 0
