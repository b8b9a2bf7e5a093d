"""The search service behind ``convret serve``: model, index and passage store loaded once, read-only after.

:meth:`SearchService.run_batch` is what a batch runs (in the batcher's worker thread): one
:meth:`SessionEncoder.encode_requests` call (one forward: the sessions and passages packed into rows with
``SessionLayout`` as ``convret encode`` packs them, each running only its uncached tokens), one faiss search per
distinct ``top_k``, then the hits' texts from the passage store. If the batch raises, its jobs are retried one by
one, so that the job that fails fails alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..retrieval.session_encoder import SessionEncoder
from .batching import Job, JobResult
from .store import STORE_NAME, PassageStore, open_store

__all__ = ["SearchService"]


class SearchService:
    """Model, index and passage store, loaded once and read-only afterwards.

    Args:
        encoder: the :class:`SessionEncoder` (model + cache).
        index, doc_ids: a faiss index or a list of index shards, and its passage ids
            (``convret.retrieval.index.load_index``).
        store: the passages' texts: ``store.get(ids) -> [(text, title)]`` (a :class:`PassageStore`, built from
            the collection the index was built from, holding every id of the index).
    """

    def __init__(self, encoder: SessionEncoder, index: Any, doc_ids: list[str], store: PassageStore):
        index = list(index) if isinstance(index, (list, tuple)) else [index]
        if index[0].d != encoder.encoder.dim:
            raise ValueError(f"the index holds vectors of dimension {index[0].d} but the model embeds in "
                             f"{encoder.encoder.dim}: they were not built from the same model")
        from ..retrieval.search import id_ranks

        self.encoder = encoder
        self.index = index
        self.doc_ids = doc_ids
        self.id_rank = id_ranks(doc_ids)  # the docid tie-break order, sorted once (not at every batch)
        self.store = store

    @classmethod
    def load(cls, model: str | os.PathLike, index: str | os.PathLike, collection: str | os.PathLike,
             cache_mb: float = 256.0, device: str | None = None, dtype: Any = None,
             token_budget: int | None = None, nprobe: int | None = None,
             ef_search: int | None = None, passage_store: str | os.PathLike | None = None, fmt: str = "auto",
             log: Callable[[str], object] = lambda message: None) -> "SearchService":
        """Load the model and the index, and open (or build, once) the passage store of ``collection`` (in format
        ``fmt``, detected by default) at ``passage_store`` (default: ``passages.sqlite`` in the index directory)."""
        from ..retrieval.encoder import Encoder
        from ..retrieval.index import DEFAULT_EF_SEARCH, configure_search, load_index

        encoder = Encoder.from_checkpoint(model, device=device, dtype=dtype)
        for p in encoder.model.parameters():
            p.requires_grad_(False)
        shards, doc_ids, _ = load_index(index)
        for shard in shards:  # the same search settings as `convret search` (IVF nprobe, HNSW efSearch)
            configure_search(shard, nprobe, DEFAULT_EF_SEARCH if ef_search is None else ef_search)
        store = open_store(passage_store or Path(index) / STORE_NAME, collection, doc_ids, fmt=fmt, log=log)
        return cls(SessionEncoder(encoder, cache_mb=cache_mb, token_budget=token_budget), shards, doc_ids, store)

    def run_batch(self, jobs: Sequence[Job]) -> list[JobResult | BaseException]:
        """Encode every job's requests in one forward, then search; per job a result or the exception it
        raised (a failing batch is retried job by job, so that one bad job fails alone)."""
        try:
            return self._run(jobs)
        except Exception:  # noqa: BLE001  (isolate the failing job)
            if len(jobs) == 1:
                raise
        results: list[JobResult | BaseException] = []
        for job in jobs:
            try:
                results.extend(self._run([job]))
            except Exception as error:  # noqa: BLE001
                results.append(error)
        return results

    def _run(self, jobs: Sequence[Job]) -> list[JobResult | BaseException]:
        from ..retrieval.search import search_index

        requests = [r for job in jobs for r in job.requests]
        vectors, infos = self.encoder.encode_requests(requests)
        results, start = [], 0
        for job in jobs:
            n = len(job.requests)
            results.append(JobResult(vectors[start : start + n], infos[start : start + n]))
            start += n
        by_k: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            if job.top_k is not None:
                by_k.setdefault(job.top_k, []).append(j)
        for top_k, members in by_k.items():
            queries = np.stack([results[j].vectors[0] for j in members])
            scores, indices = search_index(self.index, queries, top_k, ids=self.doc_ids, id_rank=self.id_rank)
            for row, j in enumerate(members):
                results[j].hits = [(self.doc_ids[i], float(s)) for s, i in zip(scores[row], indices[row]) if i >= 0]
                results[j].passages = self.store.get([pid for pid, _ in results[j].hits])
        return results
