"""Dynamic batching of ``convret serve``: jobs gather on the event loop, forwards run in one worker thread.

The queue is bounded in new tokens (``max_queued_tokens``): a job that would pass the bound is refused at once
(:class:`QueueFull`, answered 503 with ``Retry-After``) rather than queued behind minutes of work. A job whose
client has gone, timed out or been cancelled by the server's shutdown is skipped when its batch is formed: its
forward never runs. The worker is a daemon thread, so a forward in progress when the server stops does not hold
the process past its graceful timeout; the queued jobs are dropped, not run, when the batcher stops.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..retrieval.session_encoder import EncodeInfo, PassageRequest, SessionRequest
from .metrics import Metrics

__all__ = ["Job", "JobResult", "Batcher", "QueueFull"]


@dataclass
class Job:
    """One HTTP request's work: its prepared requests and, for a search, ``top_k``."""

    requests: list[SessionRequest | PassageRequest]
    top_k: int | None = None
    cost: int = 0  # new tokens (the batch and queue bounds)
    future: asyncio.Future | None = None


@dataclass
class JobResult:
    vectors: np.ndarray
    infos: list[EncodeInfo]
    hits: list[tuple[str, float]] = field(default_factory=list)
    passages: list[tuple[str, str]] = field(default_factory=list)  # (text, title) of each hit


class QueueFull(Exception):
    """The batch queue holds ``max_queued_tokens`` new tokens already: come back after ``retry_after`` s."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(f"the batch queue is full ({queued} new tokens waiting, limit max_queued_tokens={limit}); "
                         f"retry after {retry_after} s")
        self.retry_after = retry_after


class _Worker:
    """One daemon thread that runs functions for the event loop, one at a time (never joined at exit)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _main(self) -> None:
        while (item := self._jobs.get()) is not None:
            loop, future, fn, args = item
            try:
                outcome, value = True, fn(*args)
            except BaseException as error:  # noqa: BLE001  (handed to the awaiting coroutine)
                outcome, value = False, error
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, value)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if not future.done():
        future.set_result(value) if ok else future.set_exception(value)


class Batcher:
    """Dynamic batching of jobs on the event loop, forwards in one worker thread.

    Args:
        run_batch: ``run_batch(jobs) -> [result or exception]`` (called in the worker thread).
        max_wait_ms: how long the first job of a batch waits for company, under load (when the previous batch
            held more than one job or jobs are queued); a lone request runs at once.
        max_batch_tokens: new tokens per batch (a job larger than that runs alone).
        max_batch_requests: jobs per batch (1: batching off).
        max_queued_tokens: new tokens waiting at most (a job that would pass it is refused with
            :class:`QueueFull`, unless the queue is empty).
        always_wait: every batch waits ``max_wait_ms`` for company, also a lone request's.
    """

    def __init__(self, run_batch: Callable[[Sequence[Job]], list], max_wait_ms: float = 5.0,
                 max_batch_tokens: int = 16384, max_batch_requests: int = 64, max_queued_tokens: int = 65536,
                 metrics: Metrics | None = None, always_wait: bool = False):
        self.run_batch = run_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max(1, max_batch_requests)
        self.max_queued_tokens = max_queued_tokens
        self.metrics = metrics
        self.always_wait = always_wait
        self.queued_tokens = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker: _Worker | None = None
        self._carry: Job | None = None
        self._running: list[Job] = []
        self._last_size = 0
        self._batch_seconds = 0.05  # a running estimate of one batch's time (for Retry-After)

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._queue = asyncio.Queue()
        self.queued_tokens, self._carry, self._last_size = 0, None, 0
        self._worker = _Worker("convret-forward")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop at once: queued jobs are dropped (by now nobody waits for them: the server has answered or
        cancelled every request), a forward in progress finishes in its daemon thread, unawaited."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        dropped = [self._carry] if self._carry is not None else []
        while not self._queue.empty():
            dropped.append(self._queue.get_nowait())
        for job in dropped:
            self._skip(job)
        for job in dropped + self._running:
            if not job.future.done():
                job.future.cancel()
        self._running = []
        self._worker.stop()
        self._task = self._worker = self._carry = None

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the time to run the queue, at the recent time per batch."""
        batches = 1 + self.queued_tokens / max(1, self.max_batch_tokens)
        return int(min(60, max(1, math.ceil(batches * self._batch_seconds))))

    async def submit(self, job: Job) -> JobResult:
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        if self.queued_tokens and self.queued_tokens + job.cost > self.max_queued_tokens:
            raise QueueFull(self.queued_tokens, self.max_queued_tokens, self.retry_after())
        job.future = asyncio.get_running_loop().create_future()
        self._add_queued(job.cost)
        self._queue.put_nowait(job)
        return await job.future  # cancelled with the request: the job is skipped if still queued

    def _add_queued(self, tokens: int) -> None:
        self.queued_tokens += tokens
        if self.metrics is not None:
            self.metrics.queued_tokens.set(self.queued_tokens)

    def _skip(self, job: Job) -> None:
        self._add_queued(-job.cost)
        if self.metrics is not None:
            self.metrics.skipped_jobs.inc()

    async def _take(self, timeout: float | None) -> Job:
        """The next live job (skipping those whose request was cancelled). Raises ``asyncio.TimeoutError`` when
        ``timeout`` passes first (``<= 0``: only what is queued now)."""
        while True:
            if timeout is None:
                job = await self._queue.get()
            elif self._queue.empty():
                if timeout <= 0:
                    raise asyncio.TimeoutError
                job = await asyncio.wait_for(self._queue.get(), timeout)
            else:
                job = self._queue.get_nowait()
            if not job.future.done():
                return job
            self._skip(job)

    async def _next_batch(self) -> list[Job]:
        first = self._carry
        self._carry = None
        if first is None or first.future.done():
            if first is not None:
                self._skip(first)
            first = await self._take(None)
        batch, tokens = [first], first.cost
        # wait for company only under load (the previous batch was shared or jobs are queued): a lone client
        # pays no batching delay, and while a forward runs the next jobs queue up by themselves
        under_load = self.always_wait or self._last_size > 1 or not self._queue.empty()
        deadline = time.monotonic() + (self.max_wait if under_load else 0.0)
        while len(batch) < self.max_batch_requests:
            try:
                job = await self._take(deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if tokens + job.cost > self.max_batch_tokens:
                self._carry = job
                break
            batch.append(job)
            tokens += job.cost
        self._last_size = len(batch)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            # jobs cancelled while the batch formed (their clients went) are not run
            live = [job for job in batch if not job.future.done()]
            for job in batch:
                self._add_queued(-job.cost)
                if job.future.done() and self.metrics is not None:
                    self.metrics.skipped_jobs.inc()
            if not live:
                continue
            started = time.perf_counter()
            self._running = live
            try:
                results = await self._worker.run(self.run_batch, live)
            except Exception as error:  # noqa: BLE001
                results = [error] * len(live)
            finally:
                self._running = []
            seconds = time.perf_counter() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            if self.metrics is not None:
                self.metrics.batch_requests.observe(len(live))
                self.metrics.batch_tokens.observe(sum(j.cost for j in live))
                self.metrics.batch_seconds.observe(seconds)
            for job, result in zip(live, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
