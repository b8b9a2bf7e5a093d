"""``convret serve``: conversational search as an HTTP service (FastAPI + uvicorn).

- :mod:`convret.serve.service`: model, index and collection loaded once; the dynamic batcher.
- :mod:`convret.serve.app`: the FastAPI app (endpoints, validation, limits, API key, metrics).
- :mod:`convret.serve.main`: the command line.

The incremental session encoder it runs on is :class:`convret.retrieval.session_encoder.SessionEncoder`.
"""
