"""The FastAPI application of ``convret serve``: endpoints, validation, limits, API key, metrics.

Endpoints (JSON bodies, pydantic validation; the OpenAPI page is at ``/docs``):

- ``POST /v1/search``: ``{"conversation_id"?, "turns": [{"role", "text"}], "top_k"?}`` -> the top passages
  (id, score, text, title) and how the session was encoded (tokens reused from the cache, tokens computed).
- ``POST /v1/encode``: ``{"sessions"?: [{"turns", "conversation_id"?}], "passages"?: [{"text", "title"?}]}``
  -> their vectors.
- ``GET /healthz``: liveness and what is loaded (never needs the API key).
- ``GET /metrics``: Prometheus text format.

No request field names a file or a path: the model, index and collection are fixed when the server starts.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..retrieval.session_encoder import turns_of
from .service import Batcher, Job, Metrics, SearchService

__all__ = ["Limits", "create_app", "token_upper_bound"]

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")


@dataclass
class Limits:
    """Per-request limits (413: body size and tokens; 422: counts and values)."""

    max_body_bytes: int = 1 << 20
    max_turns: int = 256
    max_text_chars: int = 32768
    max_tokens: int = 32768  # in the texts of one session or passage (before the model's truncation)
    max_top_k: int = 1000
    max_items: int = 256  # sessions + passages of one /v1/encode request


@dataclass
class ServeSettings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    max_batch_requests: int = 64
    always_wait: bool = False


# ---------------------------------------------------------------------------------------------- schemas
class TurnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    text: str

    @field_validator("role", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        # "User" / "ASSISTANT" as every convret reader accepts them
        return value.lower() if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty text")
        return value


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: str | None = Field(None, description="reuse this conversation's cached session; 1-128 of "
                                                          "[A-Za-z0-9._:@+=-]")
    turns: list[TurnIn] = Field(..., min_length=1, description="the session, oldest first; the last turn is the "
                                                               "user's query")
    top_k: int = Field(10, ge=1)


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: str | None = None
    turns: list[TurnIn] = Field(..., min_length=1)


class PassageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    title: str | None = None


class EncodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions: list[SessionIn] = Field(default_factory=list)
    passages: list[PassageIn] = Field(default_factory=list)


class Encoding(BaseModel):
    reused_tokens: int
    computed_tokens: int
    total_tokens: int
    cache: str


class Hit(BaseModel):
    id: str
    score: float
    text: str
    title: str


class SearchOut(BaseModel):
    conversation_id: str | None
    results: list[Hit]
    encoding: Encoding


class EncodeOut(BaseModel):
    dim: int
    sessions: list[list[float]]
    passages: list[list[float]]
    encodings: list[Encoding]


def token_upper_bound(texts: list[str]) -> int:
    """An upper bound of the tokens any of the field's tokenizers makes of ``texts`` (no special tokens).

    Every token of a byte-level BPE (GPT-2, Llama 3, Qwen), a SentencePiece / Metaspace vocabulary with byte
    fallback (Llama 2, Mistral), WordPiece or Unigram covers at least one byte of the text as the tokenizer sees
    it; that text is at most 3x the UTF-8 bytes (a space becomes the 3-byte ``▁``) plus one prepended ``▁``.
    Checking the token limit against this bound first spares the server a second tokenisation of every
    ordinary request (the session is tokenised once more, through the chat template, to be encoded)."""
    return sum(3 * len(text.encode("utf-8")) + 3 for text in texts)


class LimitError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------- the app
def create_app(service: SearchService, settings: ServeSettings | None = None) -> FastAPI:
    """The application serving ``service``; the batcher starts and stops with the app's lifespan (a SIGTERM
    lets uvicorn finish the requests in flight, then the batcher finishes its queue and stops)."""
    settings = settings or ServeSettings()
    limits = settings.limits
    metrics = Metrics(service.encoder)
    # tokenising holds the GIL: two threads keep the event loop and the forward thread responsive, where
    # starlette's default pool of 40 would let 32 concurrent tokenisations starve both
    tokenize_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="convret-tokenize")

    async def run_in_threadpool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)
    batcher = Batcher(service.run_batch, settings.max_wait_ms, settings.max_batch_tokens,
                      settings.max_batch_requests, metrics, settings.always_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        tokenize_pool.shutdown(wait=False)

    app = FastAPI(title="convret serve", version="1", lifespan=lifespan,
                  description="Conversational dense retrieval; each new turn is encoded on top of the cached "
                              "session.")
    app.state.service, app.state.batcher, app.state.metrics = service, batcher, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next(e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid")
            return JSONResponse({"detail": f"malformed JSON: {ctx.get('error', 'cannot parse the body')}"}, 400)
        return JSONResponse({"detail": [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"),
                                         "type": e.get("type")} for e in errors]}, 422)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, error: LimitError):
        return JSONResponse({"detail": error.message}, error.status)

    def check_turns(turns: list[TurnIn], where: str = "turns") -> list[dict]:
        if len(turns) > limits.max_turns:
            raise LimitError(422, f"{where}: {len(turns)} turns exceed the limit max_turns={limits.max_turns}")
        for i, t in enumerate(turns):
            if len(t.text) > limits.max_text_chars:
                raise LimitError(422, f"{where}[{i}].text: {len(t.text)} characters exceed the limit "
                                      f"max_text_chars={limits.max_text_chars}")
        return [{"role": t.role, "text": t.text} for t in turns]

    def check_conversation_id(cid: str | None, where: str) -> None:
        if cid is not None and not CONVERSATION_ID.match(cid):
            raise LimitError(422, f"{where}: must be 1-128 characters of [A-Za-z0-9._:@+=-]")

    tokenizer = service.encoder.encoder.tokenizer

    def text_tokens(texts: list[str]) -> int:
        """Tokens of ``texts``; not counted (the bound returned) when the byte bound is within the limit."""
        bound = token_upper_bound(texts)
        if bound <= limits.max_tokens:
            return bound
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)

    def session_request(cid, turns, where):
        # the limit is on what was sent (before the model's own truncation): tokenising is work too
        count = text_tokens([t["text"] for t in turns])
        if count > limits.max_tokens:
            raise LimitError(413, f"{where}: the turns hold {count} tokens, over the limit "
                                  f"max_tokens={limits.max_tokens}")
        try:
            return service.encoder.session_request(cid, turns_of(turns))
        except ValueError as error:
            raise LimitError(422, f"{where}: {error}") from None

    def passage_request(p: PassageIn, where):
        if len(p.text) + len(p.title or "") > limits.max_text_chars:
            raise LimitError(422, f"{where}: over the limit max_text_chars={limits.max_text_chars}")
        from ..data.records import Passage

        count = text_tokens([p.text, p.title] if p.title else [p.text])
        if count > limits.max_tokens:
            raise LimitError(413, f"{where}: the passage holds {count} tokens, over the limit "
                                  f"max_tokens={limits.max_tokens}")
        try:
            return service.encoder.passage_request(Passage("", p.text, p.title or ""))
        except ValueError as error:
            raise LimitError(422, f"{where}: {error}") from None

    async def submit(job: Job):
        job.cost = sum(service.encoder.estimate_new_tokens(r) for r in job.requests)
        return await batcher.submit(job)

    @app.post("/v1/search", response_model=SearchOut)
    async def search(body: SearchIn) -> SearchOut:
        """The top passages for the session; reuses the conversation's cached session when it has one."""
        if body.top_k > limits.max_top_k:
            raise LimitError(422, f"top_k: {body.top_k} exceeds the limit max_top_k={limits.max_top_k}")
        check_conversation_id(body.conversation_id, "conversation_id")
        turns = check_turns(body.turns)
        request = await run_in_threadpool(session_request, body.conversation_id, turns, "turns")
        result = await submit(Job([request], top_k=body.top_k))
        texts = service.texts
        hits = [Hit(id=pid, score=score, text=texts[pid][0], title=texts[pid][1]) for pid, score in result.hits]
        return SearchOut(conversation_id=body.conversation_id, results=hits,
                         encoding=Encoding(**result.infos[0].__dict__))

    @app.post("/v1/encode", response_model=EncodeOut)
    async def encode(body: EncodeIn) -> EncodeOut:
        """Vectors of sessions and passages (the model's embeddings, as ``convret encode`` writes them)."""
        count = len(body.sessions) + len(body.passages)
        if count == 0:
            raise LimitError(422, "nothing to encode: give sessions and/or passages")
        if count > limits.max_items:
            raise LimitError(422, f"{count} sessions + passages exceed the limit max_items={limits.max_items}")
        prepared = []
        for i, s in enumerate(body.sessions):
            check_conversation_id(s.conversation_id, f"sessions[{i}].conversation_id")
            prepared.append((s.conversation_id, check_turns(s.turns, f"sessions[{i}].turns"), f"sessions[{i}]"))

        def prepare():
            return ([session_request(*args) for args in prepared]
                    + [passage_request(p, f"passages[{i}]") for i, p in enumerate(body.passages)])

        requests = await run_in_threadpool(prepare)
        result = await submit(Job(requests))
        n = len(body.sessions)
        return EncodeOut(dim=int(result.vectors.shape[1]), sessions=result.vectors[:n].tolist(),
                         passages=result.vectors[n:].tolist(),
                         encodings=[Encoding(**info.__dict__) for info in result.infos])

    @app.get("/healthz")
    async def healthz() -> dict:
        info = service.encoder.cache_info()
        return {"status": "ok", "passages": len(service.doc_ids), "dim": service.encoder.encoder.dim,
                "model": service.model_path, "index": service.index_path,
                "cache": {k: info[k] for k in ("bytes", "budget_bytes", "conversations")}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    # outermost: every answer (401, 413, 400 included) is counted and timed
    app.add_middleware(Guard, limits=limits, api_key=settings.api_key, metrics=metrics)
    return app


class Guard:
    """ASGI middleware: API key (constant-time compare), body size limit (413), UTF-8 bodies (400), request
    metrics. ``/healthz`` needs no key (load balancers probe it)."""

    OPEN_PATHS = frozenset({"/healthz"})

    def __init__(self, app, limits: Limits, api_key: str | None, metrics: Metrics):
        self.app = app
        self.limits = limits
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ("/v1/search", "/v1/encode", "/healthz", "/metrics") else "other"
        started = time.perf_counter()
        status_box = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self._handle(scope, receive, send_wrapper, path)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status_box["status"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _handle(self, scope, receive, send, path):
        if self.api_key is not None and path not in self.OPEN_PATHS and not self._authorized(scope):
            return await _reply(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                [(b"www-authenticate", b"Bearer")])
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(send, 413, f"request body of {int(declared)} bytes exceeds the limit "
                                           f"max_body_bytes={limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _reply(send, 413, f"request body exceeds the limit max_body_bytes={limit}")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            return await _reply(send, 400, f"request body is not valid UTF-8 (byte {error.start})")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
