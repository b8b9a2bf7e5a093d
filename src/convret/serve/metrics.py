"""Prometheus metrics of ``convret serve`` and the ASGI middleware that counts and times every answer."""
from __future__ import annotations

import time

from ..retrieval.session_encoder import SessionEncoder

__all__ = ["Metrics", "RequestMetrics", "ENDPOINTS"]

# answers to any other path are counted as "other" (a label per path requested would let clients grow the series)
ENDPOINTS = frozenset({"/v1/search", "/v1/encode", "/healthz", "/metrics"})


class Metrics:
    """Prometheus metrics of one service (their own registry, so that several apps in a process do not clash)."""

    def __init__(self, encoder: SessionEncoder):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("convret_requests_total", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("convret_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.in_flight = Gauge("convret_requests_in_flight", "HTTP requests being answered", registry=self.registry)
        self.admitted = Gauge("convret_requests_admitted", "requests admitted to the work endpoints and not yet "
                              "answered (bounded by --max-concurrent-requests)", registry=self.registry)
        self.shed = Counter("convret_requests_shed_total", "requests answered 503 or dropped without their work "
                            "done", ["reason"], registry=self.registry)
        self.queued_tokens = Gauge("convret_queued_tokens", "new tokens of the jobs waiting for a batch (bounded "
                                   "by --max-queued-tokens)", registry=self.registry)
        self.skipped_jobs = Counter("convret_skipped_jobs_total", "queued jobs never run: their client had gone, "
                                    "timed out or the server was stopping", registry=self.registry)
        self.batch_requests = Histogram("convret_batch_requests", "jobs (HTTP requests) per batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_tokens = Histogram("convret_batch_tokens", "tokens run through the model per batch",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=self.registry)
        self.batch_seconds = Histogram("convret_batch_seconds", "time of one batch (forward + search)",
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10),
                                       registry=self.registry)
        self.registry.register(_CacheCollector(encoder))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _CacheCollector:
    """The session cache's counters, read at each scrape (lock-free: a snapshot of plain integers)."""

    COUNTERS = (("hits", "session requests whose cached prefix was reused whole"),
                ("misses", "session requests of a conversation not in the cache"),
                ("prefix_changes", "session requests whose cached session was not a prefix (edit, truncation)"),
                ("evictions", "conversations evicted (LRU, byte budget)"),
                ("uncacheable", "sessions larger than the whole budget"),
                ("reused_tokens", "tokens whose keys / values were reused"),
                ("computed_tokens", "tokens run through the model"),
                ("forwards", "forward passes"))

    def __init__(self, encoder: SessionEncoder):
        self.encoder = encoder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = self.encoder.cache_info()
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"convret_cache_{name}", doc, value=info[name])
        yield GaugeMetricFamily("convret_cache_bytes", "bytes held by the session cache", value=info["bytes"])
        yield GaugeMetricFamily("convret_cache_budget_bytes", "the session cache's byte budget",
                                value=info["budget_bytes"])
        yield GaugeMetricFamily("convret_cache_conversations", "conversations in the session cache",
                                value=info["conversations"])


class RequestMetrics:
    """ASGI middleware, outermost: every answer (401, 413, 503 included) counted by endpoint and status, and
    timed."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
