"""The search service behind ``convret serve``: model, index and collection loaded once, a dynamic batcher.

Requests are tokenised in the request handlers (a bad one is answered there and never reaches a batch). The
:class:`Batcher` gathers concurrent jobs for up to ``max_wait_ms`` (or until ``max_batch_tokens`` new tokens or
``max_batch_requests`` jobs) and runs each batch in one worker thread: one :meth:`SessionEncoder.encode_requests`
call (one forward: the sessions and passages packed into rows with ``SessionLayout`` as ``convret encode``
packs them, each running only its uncached tokens), then one faiss search per distinct ``top_k``. If the batch
raises, its jobs are retried one by one, so that the job that fails fails alone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..retrieval.session_encoder import EncodeInfo, PassageRequest, SessionEncoder, SessionRequest

__all__ = ["Job", "Batcher", "SearchService", "Metrics"]


@dataclass
class Job:
    """One HTTP request's work: its prepared requests and, for a search, ``top_k``."""

    requests: list[SessionRequest | PassageRequest]
    top_k: int | None = None
    cost: int = 0  # new tokens (the batch bound)
    future: asyncio.Future | None = None


@dataclass
class JobResult:
    vectors: np.ndarray
    infos: list[EncodeInfo]
    hits: list[tuple[str, float]] = field(default_factory=list)


class Metrics:
    """Prometheus metrics of one service (their own registry, so that several apps in a process do not clash)."""

    def __init__(self, encoder: SessionEncoder):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("convret_requests_total", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("convret_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.in_flight = Gauge("convret_requests_in_flight", "HTTP requests being answered", registry=self.registry)
        self.batch_requests = Histogram("convret_batch_requests", "jobs (HTTP requests) per batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_tokens = Histogram("convret_batch_tokens", "tokens run through the model per batch",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=self.registry)
        self.batch_seconds = Histogram("convret_batch_seconds", "time of one batch (forward + search)",
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10),
                                       registry=self.registry)

        class CacheCollector:
            def collect(self_inner):
                info = encoder.cache_info()
                for name, key, doc in (("hits", "hits", "session requests whose cached prefix was reused whole"),
                                       ("misses", "misses", "session requests of a conversation not in the cache"),
                                       ("prefix_changes", "prefix_changes",
                                        "session requests whose cached session was not a prefix (edit, truncation)"),
                                       ("evictions", "evictions", "conversations evicted (LRU, byte budget)"),
                                       ("uncacheable", "uncacheable", "sessions larger than the whole budget"),
                                       ("reused_tokens", "reused_tokens", "tokens whose keys / values were reused"),
                                       ("computed_tokens", "computed_tokens", "tokens run through the model"),
                                       ("forwards", "forwards", "forward passes")):
                    yield CounterMetricFamily(f"convret_cache_{name}", doc, value=info[key])
                yield GaugeMetricFamily("convret_cache_bytes", "bytes held by the session cache", value=info["bytes"])
                yield GaugeMetricFamily("convret_cache_budget_bytes", "the session cache's byte budget",
                                        value=info["budget_bytes"])
                yield GaugeMetricFamily("convret_cache_conversations", "conversations in the session cache",
                                        value=info["conversations"])

        self.registry.register(CacheCollector())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class SearchService:
    """Model, index and collection, loaded once and read-only afterwards.

    Args:
        encoder: the :class:`SessionEncoder` (model + cache).
        index, doc_ids: a faiss index or a list of index shards, and its passage ids
            (``convret.retrieval.index.load_index``).
        texts: passage id -> ``(text, title)`` of the collection.
    """

    def __init__(self, encoder: SessionEncoder, index: Any, doc_ids: list[str], texts: dict[str, tuple[str, str]],
                 model_path: str = "", index_path: str = ""):
        index = list(index) if isinstance(index, (list, tuple)) else [index]
        if index[0].d != encoder.encoder.dim:
            raise ValueError(f"the index holds vectors of dimension {index[0].d} but the model embeds in "
                             f"{encoder.encoder.dim}: they were not built from the same model")
        missing = [i for i in doc_ids if i not in texts]
        if missing:
            raise ValueError(f"{len(missing)} passage ids of the index are not in the collection (first: "
                             f"{missing[0]!r}): pass the collection the index was built from")
        from ..retrieval.search import id_ranks

        self.encoder = encoder
        self.index = index
        self.doc_ids = doc_ids
        self.id_rank = id_ranks(doc_ids)  # the docid tie-break order, sorted once (not at every batch)
        self.texts = texts
        self.model_path = model_path
        self.index_path = index_path

    @classmethod
    def load(cls, model: str | os.PathLike, index: str | os.PathLike, collection: str | os.PathLike,
             cache_mb: float = 256.0, device: str | None = None, dtype: Any = None,
             token_budget: int | None = None, nprobe: int | None = None,
             ef_search: int | None = None, fmt: str = "auto") -> "SearchService":
        from ..retrieval import _data
        from ..retrieval.encoder import Encoder
        from ..retrieval.index import DEFAULT_EF_SEARCH, configure_search, load_index

        encoder = Encoder.from_checkpoint(model, device=device, dtype=dtype)
        for p in encoder.model.parameters():
            p.requires_grad_(False)
        shards, doc_ids, _ = load_index(index)
        for shard in shards:  # the same search settings as `convret search` (IVF nprobe, HNSW efSearch)
            configure_search(shard, nprobe, DEFAULT_EF_SEARCH if ef_search is None else ef_search)
        texts = {p.id: (p.text, p.title or "") for p in _data.iter_collection(collection, fmt)}
        return cls(SessionEncoder(encoder, cache_mb=cache_mb, token_budget=token_budget), shards, doc_ids,
                   texts, str(model), str(index))

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
        return results


class Batcher:
    """Dynamic batching of jobs on the event loop, forwards in one worker thread.

    Args:
        run_batch: ``run_batch(jobs) -> [result or exception]`` (called in the worker thread).
        max_wait_ms: how long the first job of a batch waits for company, under load (when the previous batch
            held more than one job or jobs are queued); a lone request runs at once.
        max_batch_tokens: new tokens per batch (a job larger than that runs alone).
        max_batch_requests: jobs per batch (1: batching off).
        always_wait: every batch waits ``max_wait_ms`` for company, also a lone request's.
    """

    def __init__(self, run_batch, max_wait_ms: float = 5.0, max_batch_tokens: int = 16384,
                 max_batch_requests: int = 64, metrics: Metrics | None = None, always_wait: bool = False):
        self.run_batch = run_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max(1, max_batch_requests)
        self.metrics = metrics
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: Job | None = None
        self._last_size = 0
        self.always_wait = always_wait
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convret-forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Finish every queued job, then stop."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> JobResult:
        if self._queue is None or self._task is None:
            raise RuntimeError("the batcher is not running")
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        return await job.future

    async def _next_batch(self) -> list[Job] | None:
        first = self._carry or await self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, tokens = [first], first.cost
        # wait for company only under load (the previous batch was shared or jobs are queued): a lone client
        # pays no batching delay, and while a forward runs the next jobs queue up by themselves
        under_load = self.always_wait or self._last_size > 1 or not self._queue.empty()
        wait = self.max_wait if under_load else 0.0
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch_requests:
            try:
                if self._queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    job = self._queue.get_nowait()
            except asyncio.TimeoutError:
                break
            if job is None:  # stop: finish this batch, then the loop sees the sentinel again
                await self._queue.put(None)
                break
            if tokens + job.cost > self.max_batch_tokens:
                self._carry = job
                break
            batch.append(job)
            tokens += job.cost
        self._last_size = len(batch)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as error:  # noqa: BLE001
                results = [error] * len(batch)
            if self.metrics is not None:
                self.metrics.batch_requests.observe(len(batch))
                self.metrics.batch_tokens.observe(sum(j.cost for j in batch))
                self.metrics.batch_seconds.observe(time.perf_counter() - started)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
