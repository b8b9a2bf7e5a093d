"""The FastAPI application of ``convret serve``: its endpoints, and the middlewares assembled around them.

Endpoints (JSON bodies, pydantic validation: :mod:`convret.serve.schemas`; the OpenAPI page is at ``/docs``):

- ``POST /v1/search``: ``{"conversation_id"?, "turns": [{"role", "text"}], "top_k"?}`` -> the top passages
  (id, score, text, title) and how the session was encoded (tokens reused from the cache, tokens computed).
- ``POST /v1/encode``: ``{"sessions"?: [{"turns", "conversation_id"?}], "passages"?: [{"text", "title"?}]}``
  -> their vectors.
- ``GET /healthz``: liveness for anyone; what is loaded, to an authenticated caller.
- ``GET /metrics``: Prometheus text format.

A request passes, outermost first: :class:`~convret.serve.metrics.RequestMetrics` (every answer counted),
CORS (when origins are allowed: a preflight is answered here), :class:`~convret.serve.auth.Authentication`,
:class:`~convret.serve.admission.AdmissionControl`, :class:`~convret.serve.limits.BodyLimit`, then the routes.
The routes read everything from ``app.state.convret`` (:class:`AppState`), so that another router can be
included into the app (``app.include_router``) and reach the same service.

No request field names a file or a path: the model, index and passages are fixed when the server starts.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..data.records import Passage
from ..retrieval.session_encoder import turns_of
from .admission import Admission, AdmissionControl, Admitted
from .auth import AUTHENTICATED, TENANT, ApiKeys, Authentication
from .batching import Batcher, Job, QueueFull
from .limits import BodyLimit, LimitError, Limits, token_upper_bound
from .metrics import Metrics, RequestMetrics
from .schemas import (EncodeIn, EncodeOut, Encoding, ErrorOut, HealthOut, Hit, PassageIn, SearchIn, SearchOut,
                      TurnIn, ValidationErrorOut)
from .service import SearchService

__all__ = ["ServeSettings", "AppState", "create_app", "router", "Limits", "Admission", "token_upper_bound"]

T = TypeVar("T")


@dataclass
class ServeSettings:
    """Everything ``convret serve``'s flags set besides the model, index and passages (build with keywords)."""

    limits: Limits = field(default_factory=Limits)
    admission: Admission = field(default_factory=Admission)
    api_keys: list[str] = field(default_factory=list)  # empty: no key asked (a loopback bind only)
    cors_origins: list[str] = field(default_factory=list)
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    max_batch_requests: int = 64
    always_wait: bool = False


@dataclass
class AppState:
    """What the routes use (``app.state.convret``); the tokenising threads live as long as the app's lifespan."""

    service: SearchService
    settings: ServeSettings
    metrics: Metrics
    batcher: Batcher
    admitted: Admitted = field(default_factory=Admitted)
    tokenize_pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a tokenising thread (tokenising holds the GIL: two threads keep the event loop and the
        forward thread responsive, where starlette's default pool of 40 would let 32 tokenisations starve both).
        Cancelled with the request when it has not started."""
        if self.tokenize_pool is None:
            raise RuntimeError("the app is not running (its lifespan has not started)")
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn)


def create_app(service: SearchService, settings: ServeSettings | None = None) -> FastAPI:
    """The application serving ``service``. Its lifespan starts the batcher and the tokenising threads and stops
    them (dropping queued jobs nobody waits for); it can run any number of times."""
    settings = settings or ServeSettings()
    metrics = Metrics(service.encoder)
    batcher = Batcher(service.run_batch, max_wait_ms=settings.max_wait_ms,
                      max_batch_tokens=settings.max_batch_tokens, max_batch_requests=settings.max_batch_requests,
                      max_queued_tokens=settings.admission.max_queued_tokens, metrics=metrics,
                      always_wait=settings.always_wait)
    state = AppState(service=service, settings=settings, metrics=metrics, batcher=batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.tokenize_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                                    thread_name_prefix="convret-tokenize")
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
            state.tokenize_pool = None

    app = FastAPI(title="convret serve", version="1", lifespan=lifespan,
                  description="Conversational dense retrieval; each new turn is encoded on top of the cached "
                              "session.")
    app.state.convret = state
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(LimitError, _over_limit)
    app.add_exception_handler(QueueFull, _queue_full)
    app.include_router(router)
    # added innermost first: each add_middleware wraps everything added before it
    app.add_middleware(BodyLimit, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(AdmissionControl, settings=settings.admission, metrics=metrics,
                       retry_after=batcher.retry_after, admitted=state.admitted)
    app.add_middleware(Authentication, keys=ApiKeys(settings.api_keys) if settings.api_keys else None)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


# ---------------------------------------------------------------------------------------------- errors
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        reason = broken.get("ctx", {}).get("error", "cannot parse the body")
        return JSONResponse({"detail": f"malformed JSON: {reason}"}, 400)
    return JSONResponse({"detail": [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"),
                                     "type": e.get("type")} for e in errors]}, 422)


async def _over_limit(request: Request, error: LimitError) -> JSONResponse:
    if error.status == 422:  # the shape of every other 422: a list of errors naming the field
        return JSONResponse({"detail": [{"loc": [str(p) for p in error.loc], "msg": error.message,
                                         "type": "limit"}]}, 422)
    return JSONResponse({"detail": error.message}, error.status)


async def _queue_full(request: Request, error: QueueFull) -> JSONResponse:
    request.app.state.convret.metrics.shed.labels("queue_full").inc()
    return JSONResponse({"detail": str(error)}, 503, headers={"Retry-After": str(error.retry_after)})


ERRORS = {400: {"model": ErrorOut, "description": "malformed JSON, or a body that is not UTF-8"},
          401: {"model": ErrorOut, "description": "missing or wrong API key"},
          413: {"model": ErrorOut, "description": "a body or session over the size limits"},
          422: {"model": ValidationErrorOut, "description": "invalid or over a count limit"},
          503: {"model": ErrorOut, "description": "overloaded, timed out or shutting down: retry after the "
                                                 "Retry-After header's seconds"}}


# ---------------------------------------------------------------------------------------------- preparing
def check_turns(turns: list[TurnIn], limits: Limits, loc: tuple) -> list[dict]:
    if len(turns) > limits.max_turns:
        raise LimitError(422, f"{len(turns)} turns exceed the limit max_turns={limits.max_turns}", loc)
    for i, turn in enumerate(turns):
        if len(turn.text) > limits.max_text_chars:
            raise LimitError(422, f"{len(turn.text)} characters exceed the limit max_text_chars="
                                  f"{limits.max_text_chars}", (*loc, i, "text"))
    return [{"role": t.role, "text": t.text} for t in turns]


def _text_tokens(state: AppState, texts: list[str]) -> int:
    """Tokens of ``texts``; not counted (the bound returned) when the byte bound is within the limit."""
    bound = token_upper_bound(texts)
    if bound <= state.settings.limits.max_tokens:
        return bound
    tokenizer = state.service.encoder.encoder.tokenizer
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)


def _session_request(state: AppState, cache_key: str | None, turns: list[dict], loc: tuple):
    # the limit is on what was sent (before the model's own truncation): tokenising is work too
    limit = state.settings.limits.max_tokens
    count = _text_tokens(state, [t["text"] for t in turns])
    if count > limit:
        raise LimitError(413, f"{'.'.join(map(str, loc))}: the turns hold {count} tokens, over the limit "
                              f"max_tokens={limit}")
    try:
        return state.service.encoder.session_request(cache_key, turns_of(turns))
    except ValueError as error:
        raise LimitError(422, str(error), loc) from None


def _passage_request(state: AppState, passage: PassageIn, loc: tuple):
    limits = state.settings.limits
    if len(passage.text) + len(passage.title or "") > limits.max_text_chars:
        raise LimitError(422, f"over the limit max_text_chars={limits.max_text_chars}", loc)
    count = _text_tokens(state, [passage.text, passage.title] if passage.title else [passage.text])
    if count > limits.max_tokens:
        raise LimitError(413, f"{'.'.join(map(str, loc))}: the passage holds {count} tokens, over the limit "
                              f"max_tokens={limits.max_tokens}")
    try:
        return state.service.encoder.passage_request(Passage("", passage.text, passage.title or ""))
    except ValueError as error:
        raise LimitError(422, str(error), loc) from None


def _job(state: AppState, requests: list, top_k: int | None = None) -> Job:
    """A job and its cost: the new tokens of its requests against the cache now (a loop over the cached tokens:
    run in the tokenising thread, never on the event loop)."""
    encoder = state.service.encoder
    return Job(requests, top_k=top_k, cost=sum(encoder.estimate_new_tokens(r) for r in requests))


def _cache_key(request: Request, conversation_id: str | None) -> str | None:
    """The conversation's key in the session cache: namespaced by the caller's API key (its tenant), so that no
    tenant reuses, or learns the length of, another's cached session."""
    if conversation_id is None:
        return None
    tenant = request.scope.get(TENANT, "")
    return f"{tenant}/{conversation_id}" if tenant else conversation_id


# ---------------------------------------------------------------------------------------------- routes
router = APIRouter()


@router.post("/v1/search", response_model=SearchOut, responses=ERRORS)
async def search(body: SearchIn, request: Request) -> SearchOut:
    """The top passages for the session; reuses the conversation's cached session when it has one."""
    state: AppState = request.app.state.convret
    limits = state.settings.limits
    if body.top_k > limits.max_top_k:
        raise LimitError(422, f"top_k: {body.top_k} exceeds the limit max_top_k={limits.max_top_k}",
                         ("body", "top_k"))
    turns = check_turns(body.turns, limits, ("body", "turns"))
    key = _cache_key(request, body.conversation_id)
    job = await state.in_thread(lambda: _job(state, [_session_request(state, key, turns, ("body", "turns"))],
                                             body.top_k))
    result = await state.batcher.submit(job)
    hits = [Hit(id=pid, score=score, text=text, title=title)
            for (pid, score), (text, title) in zip(result.hits, result.passages)]
    return SearchOut(conversation_id=body.conversation_id, results=hits,
                     encoding=Encoding(**result.infos[0].__dict__))


@router.post("/v1/encode", response_model=EncodeOut, responses=ERRORS)
async def encode(body: EncodeIn, request: Request) -> EncodeOut:
    """Vectors of sessions and passages (the model's embeddings, as ``convret encode`` writes them)."""
    state: AppState = request.app.state.convret
    limits = state.settings.limits
    count = len(body.sessions) + len(body.passages)
    if count == 0:
        raise LimitError(422, "nothing to encode: give sessions and/or passages")
    if count > limits.max_items:
        raise LimitError(422, f"{count} sessions + passages exceed the limit max_items={limits.max_items}")
    sessions = [(_cache_key(request, s.conversation_id), check_turns(s.turns, limits, ("body", "sessions", i,
                                                                                         "turns")),
                 ("body", "sessions", i, "turns")) for i, s in enumerate(body.sessions)]

    def prepare() -> Job:
        return _job(state, [_session_request(state, *args) for args in sessions]
                    + [_passage_request(state, p, ("body", "passages", i)) for i, p in enumerate(body.passages)])

    result = await state.batcher.submit(await state.in_thread(prepare))
    n = len(body.sessions)
    return EncodeOut(dim=int(result.vectors.shape[1]), sessions=result.vectors[:n].tolist(),
                     passages=result.vectors[n:].tolist(),
                     encodings=[Encoding(**info.__dict__) for info in result.infos])


@router.get("/healthz", response_model=HealthOut, response_model_exclude_none=True)
async def healthz(request: Request) -> HealthOut:
    """Liveness (no key needed). An authenticated caller (any caller on a server without keys) also gets what
    is loaded and the load; no path is ever named."""
    if not request.scope.get(AUTHENTICATED, True):
        return HealthOut(status="ok")
    state: AppState = request.app.state.convret
    service, admission = state.service, state.settings.admission
    info = service.encoder.cache_info()
    return HealthOut(status="ok", passages=len(service.doc_ids), dim=service.encoder.encoder.dim,
                     cache={k: info[k] for k in ("bytes", "budget_bytes", "conversations")},
                     admission={"admitted_requests": state.admitted.count,
                                "max_concurrent_requests": admission.max_concurrent_requests,
                                "queued_tokens": state.batcher.queued_tokens,
                                "max_queued_tokens": admission.max_queued_tokens})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    """Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.convret.metrics.render(), media_type=CONTENT_TYPE_LATEST)
