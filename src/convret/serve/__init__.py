"""``convret serve``: conversational search as an HTTP service (FastAPI + uvicorn).

- :mod:`convret.serve.app`: the FastAPI app (endpoints; the middlewares assembled around them).
- :mod:`convret.serve.schemas`: request and answer bodies (the OpenAPI schema).
- :mod:`convret.serve.auth`: API keys, each a tenant with its own session-cache namespace.
- :mod:`convret.serve.admission`: concurrency bound, request timeout, work of clients that have gone.
- :mod:`convret.serve.limits`: per-request limits and the body-size middleware.
- :mod:`convret.serve.batching`: the dynamic batcher (bounded queue, one forward thread).
- :mod:`convret.serve.metrics`: Prometheus metrics and the request-metrics middleware.
- :mod:`convret.serve.store`: the passage store (the collection's texts on disk, SQLite).
- :mod:`convret.serve.service`: model, index and passage store loaded once; what a batch runs.
- :mod:`convret.serve.main`: the command line.

The incremental session encoder it runs on is :class:`convret.retrieval.session_encoder.SessionEncoder`.
"""
