"""``convret serve``: conversational search over HTTP, each new turn encoded on top of the cached session.

See :mod:`convret.serve.app` for the endpoints and docs/serve.md for the API, limits, metrics and scaling out.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys

from .._args import parse

__all__ = ["main", "build_parser", "is_loopback", "settings_from_args", "check_inputs"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_inputs(model: str, index: str, collection: str, fmt: str = "auto", allow_model_mismatch: bool = False
                 ) -> None:
    """What start-up checks before loading anything large: ``model`` is a checkpoint, ``index`` an index whose
    passages that checkpoint encoded (:func:`~convret.retrieval.index.check_same_model`), ``collection`` a
    readable collection. Raises ``ValueError`` naming the input and the fix."""
    from ..provenance import content_identity
    from ..retrieval import _data
    from ..retrieval.index import check_same_model, read_index_meta
    from ..train.checkpoint import CONFIG_NAME, is_checkpoint

    if not is_checkpoint(model):
        raise ValueError(f"--model {model}: not a convret checkpoint (no {CONFIG_NAME}); give convret train's "
                         "OUTPUT_DIR/final")
    check_same_model(index, read_index_meta(index), content_identity(model), model, f"--model {model}",
                     allow_model_mismatch, lambda message: print(f"convret serve: {message}", file=sys.stderr))
    _data.check_input(collection, fmt, "collection")


def build_parser() -> argparse.ArgumentParser:
    from .admission import Admission
    from .limits import Limits

    d, a = Limits(), Admission()
    p = argparse.ArgumentParser(
        prog="convret serve",
        description="Serve conversational search over HTTP (FastAPI + uvicorn): POST /v1/search, POST /v1/encode, "
                    "GET /healthz, GET /metrics (Prometheus), OpenAPI page at /docs. Each conversation's session "
                    "is cached (keys / values per layer) so that a new turn runs only its new tokens; concurrent "
                    "requests are batched into one forward pass. Binds 127.0.0.1 unless --host says otherwise; any "
                    "other address requires --api-key-file. Under load it sheds work (503 with Retry-After) "
                    "rather than queueing without bound. SIGTERM finishes the requests in flight, then exits.")
    p.add_argument("--model", required=True, help="checkpoint directory (convret train's OUTPUT_DIR/final)")
    p.add_argument("--index", required=True, help="index directory (convret index) built with this model")
    p.add_argument("--collection", required=True, help="the collection the index was built from (passage texts)")
    from ..data.readers import COLLECTION_FORMATS

    p.add_argument("--format", default="auto", choices=["auto", *COLLECTION_FORMATS], metavar="FORMAT",
                   help="format of --collection (default: auto, detected from its first record; "
                        f"{', '.join(COLLECTION_FORMATS)})")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="start even when --model is not the checkpoint that encoded the index's passages (an error "
                        "otherwise: the scores would mean nothing)")
    p.add_argument("--passage-store", default=None,
                   help="the passages' texts on disk (SQLite), built from --collection at the first start and "
                        "reused while the collection and the index are unchanged (default: INDEX/passages.sqlite)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key-file", default=None,
                   help="file of API keys, one per line, that clients send as 'Authorization: Bearer KEY' "
                        "(required on any non-loopback --host); each key has a session cache namespace of its own")
    p.add_argument("--cache-mb", type=float, default=256.0,
                   help="byte budget of the session cache in MiB (LRU over conversations; 0 disables it)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF indexes: inverted lists probed per query (default: as `convret search`, max(128, nlist/8))")
    p.add_argument("--ef-search", type=int, default=None,
                   help="HNSW indexes: efSearch (default: as `convret search`)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype to run the model in (default: the saved dtype)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the forward pass (default: torch's; on a CPU shared with other work, "
                        "fewer threads avoid OpenMP stalls)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others under load (default 5)")
    p.add_argument("--always-wait", action="store_true",
                   help="every batch waits --max-wait-ms for company (default: only under load, so that a lone "
                        "request is not delayed)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="new tokens per batch (default 16384)")
    p.add_argument("--max-queued-tokens", type=int, default=a.max_queued_tokens,
                   help="new tokens waiting for a batch at most; a request that would pass it gets 503 with "
                        f"Retry-After (default {a.max_queued_tokens})")
    p.add_argument("--max-batch-requests", type=int, default=64, help="requests per batch (default 64)")
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass")
    p.add_argument("--token-budget", type=int, default=None,
                   help="key positions per packed row (default: convret encode's)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above this request size")
    p.add_argument("--max-turns", type=int, default=d.max_turns, help="422 above this many turns")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="422 above this many characters "
                                                                                 "in one turn or passage")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="413 when the texts of one session or passage hold more tokens (counted before the model's "
                        "own truncation to its max_session_len / max_passage_len)")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help="422 above this top_k")
    p.add_argument("--max-items", type=int, default=d.max_items, help="422 above this many items in /v1/encode")
    p.add_argument("--max-concurrent-requests", type=int, default=a.max_concurrent_requests,
                   help="requests admitted at once to /v1/*; one more gets 503 with Retry-After before its body is "
                        f"read; /healthz and /metrics are not counted (default {a.max_concurrent_requests})")
    p.add_argument("--max-connections", type=int, default=a.max_connections,
                   help="open connections at most (uvicorn's limit_concurrency: beyond it uvicorn answers 503 to "
                        f"every path); must exceed --max-concurrent-requests (default {a.max_connections})")
    p.add_argument("--request-timeout", type=float, default=a.request_timeout,
                   help="seconds from admission to answer (the body's upload included); later: 503 with "
                        f"Retry-After and the request's work cancelled (default {a.request_timeout:g})")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser requests from this origin (repeatable; CORS is off by default)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight (default 30); then the rest are answered 503 "
                        "and their queued work is dropped, and the process exits")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def settings_from_args(args: argparse.Namespace, api_keys: list[str]):
    """The :class:`~convret.serve.app.ServeSettings` of parsed flags (every field by name)."""
    from .admission import Admission
    from .app import ServeSettings
    from .limits import Limits

    limits = Limits(max_body_bytes=args.max_body_bytes, max_turns=args.max_turns,
                    max_text_chars=args.max_text_chars, max_tokens=args.max_tokens, max_top_k=args.max_top_k,
                    max_items=args.max_items)
    admission = Admission(max_concurrent_requests=args.max_concurrent_requests,
                          max_queued_tokens=args.max_queued_tokens, request_timeout=args.request_timeout,
                          max_connections=args.max_connections)
    return ServeSettings(limits=limits, admission=admission, api_keys=api_keys, cors_origins=args.cors_origin,
                         max_wait_ms=args.max_wait_ms, max_batch_tokens=args.max_batch_tokens,
                         max_batch_requests=1 if args.no_batching else args.max_batch_requests,
                         always_wait=args.always_wait)


def _check(args: argparse.Namespace) -> list[str]:
    """The API keys; raises ``ValueError`` for a flag out of range or a non-loopback bind without a key."""
    from .auth import read_api_keys

    keys = []
    if args.api_key_file:
        keys = read_api_keys(args.api_key_file)
    elif not is_loopback(args.host):
        raise ValueError(f"refusing to bind {args.host} without an API key: a non-loopback address is reachable "
                         "from other machines; pass --api-key-file FILE (or bind 127.0.0.1)")
    for name in ("max_body_bytes", "max_turns", "max_text_chars", "max_tokens", "max_top_k", "max_items",
                 "max_batch_tokens", "max_batch_requests", "max_queued_tokens", "max_concurrent_requests",
                 "max_connections"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.request_timeout > 0:
        raise ValueError("--request-timeout must be > 0 seconds")
    if args.max_connections <= args.max_concurrent_requests:
        raise ValueError(f"--max-connections ({args.max_connections}) must exceed --max-concurrent-requests "
                         f"({args.max_concurrent_requests}): the connections beyond it keep /healthz and /metrics "
                         "answering under load")
    check_inputs(args.model, args.index, args.collection, args.format, args.allow_model_mismatch)
    return keys


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        keys = _check(args)
    except ValueError as error:
        print(f"convret serve: error: {error}", file=sys.stderr)
        return 2

    import torch
    import uvicorn

    from .app import create_app
    from .service import SearchService

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        service = SearchService.load(args.model, args.index, args.collection, cache_mb=args.cache_mb,
                                     device=args.device, dtype=args.model_dtype,
                                     token_budget=args.token_budget, nprobe=args.nprobe,
                                     ef_search=args.ef_search, passage_store=args.passage_store, fmt=args.format,
                                     log=lambda message: print(f"convret serve: {message}", file=sys.stderr,
                                                               flush=True))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"convret serve: error: {error}", file=sys.stderr)
        return 1
    settings = settings_from_args(args, keys)
    app = create_app(service, settings)
    print(f"convret serve: {len(service.doc_ids)} passages, model {args.model}, cache {args.cache_mb:g} MiB, "
          f"http://{args.host}:{args.port}" + (f" ({len(keys)} API key(s) required)" if keys else ""),
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, access_log=False,
                            limit_concurrency=settings.admission.max_connections, server_header=False)
    uvicorn.Server(config).run()
    return 0
