"""Admission control of ``convret serve``: how much work the service takes on, and work nobody waits for.

- **Concurrency.** At most ``max_concurrent_requests`` requests are admitted at once (reading the body,
  tokenising, queued for a batch, in a batch); one more is answered 503 with ``Retry-After`` at once, before
  its body is read. The health probe and the metrics are never subject to it: they answer under any load.
  Below it, uvicorn's own ``limit_concurrency`` (``--max-connections``) bounds the open connections.
- **The batch queue** is bounded in tokens (:class:`convret.serve.batching.Batcher`): 503 with ``Retry-After``.
- **Time.** A request not answered within ``request_timeout`` seconds of its admission (a slow body included)
  is answered 503 with ``Retry-After``, and its work is cancelled.
- **Clients that have gone.** A client that closes its connection before its answer cancels its request: a job
  still queued is never run.
- **Shutdown.** When the server's graceful timeout runs out, uvicorn cancels the requests still in progress:
  each is answered 503 (``shutting down``) and its job, if queued, is not run.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Iterable

from ._asgi import reply
from .metrics import Metrics

__all__ = ["Admission", "AdmissionControl", "Admitted"]


@dataclass
class Admission:
    """Admission-control settings (``convret serve --max-concurrent-requests ...``; docs/serve.md)."""

    max_concurrent_requests: int = 512
    max_queued_tokens: int = 65536
    request_timeout: float = 60.0
    max_connections: int = 1024  # uvicorn's limit_concurrency: open connections and tasks


@dataclass
class Admitted:
    """The requests admitted now (the middleware counts; the health probe reads)."""

    count: int = 0


class AdmissionControl:
    """ASGI middleware applying :class:`Admission` to every path but ``exempt_paths``.

    Args:
        retry_after: the seconds to tell a refused client (``Retry-After``).
        admitted: the shared count of requests admitted.
    """

    def __init__(self, app, settings: Admission, metrics: Metrics, retry_after: Callable[[], int],
                 admitted: Admitted, exempt_paths: Iterable[str] = ("/healthz", "/metrics")):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.retry_after = retry_after
        self.admitted = admitted
        self.exempt = frozenset(exempt_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in self.exempt:
            return await self.app(scope, receive, send)
        limit = self.settings.max_concurrent_requests
        if self.admitted.count >= limit:
            return await self._refuse(send, "overloaded", f"the server is at its limit of {limit} concurrent "
                                                          f"requests (max_concurrent_requests)")
        self.admitted.count += 1
        self.metrics.admitted.set(self.admitted.count)
        try:
            await self._run(scope, receive, send)
        finally:
            self.admitted.count -= 1
            self.metrics.admitted.set(self.admitted.count)

    async def _refuse(self, send, reason: str, why: str) -> None:
        self.metrics.shed.labels(reason).inc()
        seconds = self.retry_after()
        await reply(send, 503, f"{why}; retry after {seconds} s", [(b"retry-after", str(seconds).encode())])

    async def _run(self, scope, receive, send) -> None:
        state = {"started": False, "complete": False}
        body_read, gone = asyncio.Event(), asyncio.Event()

        async def app_receive():
            if body_read.is_set():  # nothing more to read: what follows is the end of the connection
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        async def watch():
            # once the body is read, the next message is the end: the client going, or the answer sent
            await body_read.wait()
            if not gone.is_set():
                await receive()
            gone.set()

        app = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({app, watcher}, timeout=self.settings.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if app in done:
                return app.result()
            if watcher in done and state["complete"]:  # the answer was sent: the app is finishing
                return await app
            await _cancel(app)
            if watcher in done:  # the client has gone: its work is cancelled, nobody to answer
                self.metrics.shed.labels("client_gone").inc()
            elif not state["started"]:
                await self._refuse(send, "timeout", f"no answer within request_timeout="
                                                    f"{self.settings.request_timeout:g} s")
        except asyncio.CancelledError:  # the server's graceful timeout ran out
            await _cancel(app)
            if not state["started"]:
                self.metrics.shed.labels("shutdown").inc()
                await reply(send, 503, "the server is shutting down", [(b"retry-after", b"1")])
            raise
        finally:
            watcher.cancel()


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001  (its outcome no longer matters)
        pass
