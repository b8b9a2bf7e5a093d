"""The exploration page of ``convret serve`` (``GET /``) and the evaluation data it loads.

The page is one static HTML file with its script and style sheet (package data under
``convret/resources/page``; no build step, nothing fetched from elsewhere). It calls the JSON API like any other
client, with the API key the user types into it. The HTML holds no data, so it, its script and its style sheet
are served without a key; the data endpoints below are ``/v1`` routes like the rest, under the same
authentication, admission control and limits.

- ``GET /v1/eval/sessions``: the conversations of ``--eval-file`` (id, number of turns, first query).
- ``GET /v1/eval/session?conv_id=ID``: one conversation's turns (query id, history, query), as ``convret
  evaluate`` reads them.
- ``GET /v1/qrels?qid=QID``: the judged passages of one query of ``--qrels``.

Every answer of the page's own files carries a strict Content-Security-Policy: scripts and styles only from
the server's own files (no inline script or style, no ``eval``), requests only to the server itself, no
images, frames, forms or plugins. The script builds the page's DOM with ``textContent`` / ``createElement``
only, so that no text of a request or a passage is ever parsed as HTML.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from ..data.records import EvalTurn
from .schemas import (ErrorOut, EvalSessionOut, EvalSessionsOut, EvalSessionSummary, EvalTurnOut, QrelsOut, TurnOut,
                      ValidationErrorOut)

__all__ = ["EvalSet", "page_router", "eval_router", "PAGE_PATHS", "CONTENT_SECURITY_POLICY"]

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
# the page's files: name -> media type
_FILES = {"page.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
          "page.css": "text/css; charset=utf-8"}
PAGE_PATHS = ("/", "/static/page.js", "/static/page.css")


@dataclass
class EvalSet:
    """The evaluation sessions the page can load (``--eval-file``), and their qrels (``--qrels``), if given.

    Attributes:
        conversations: ``{conv_id: [EvalTurn, ...]}`` in the file's order.
        qrels: ``{qid: {docid: rel}}`` of the file's queries, or ``None`` without qrels.
    """

    conversations: dict[str, list[EvalTurn]]
    qrels: dict[str, dict[str, int]] | None = None

    def __post_init__(self):
        self.qids = {turn.qid for turns in self.conversations.values() for turn in turns}

    @classmethod
    def load(cls, path: str | os.PathLike, fmt: str = "auto", qrels: str | os.PathLike | None = None) -> "EvalSet":
        """Read ``path`` as ``convret evaluate`` reads ``--conversations`` (format ``fmt``, detected by default)
        and ``qrels`` as TREC qrels. Qrels of queries the file lacks are dropped.

        Raises:
            ValueError: an unreadable file (naming it, its line and the fix), or qrels with no query in common
                with the file.
        """
        from ..retrieval import _data

        fmt = _data.check_input(path, fmt, "conversations")
        conversations: dict[str, list[EvalTurn]] = {}
        for turn in _data.iter_conversations(path, fmt):
            conversations.setdefault(turn.conv_id, []).append(turn)
        judged = None
        if qrels is not None:
            qids = {turn.qid for turns in conversations.values() for turn in turns}
            all_qrels = _data.load_qrels(qrels)
            judged = {qid: docs for qid, docs in all_qrels.items() if qid in qids}
            if not judged:
                raise ValueError(f"--qrels {qrels}: no query in common with --eval-file {path} (its query ids look "
                                 f"like {sorted(qids)[:3]}, the qrels' like {sorted(all_qrels)[:3]}): wrong qrels "
                                 "or evaluation file")
        return cls(conversations, judged)


# ---------------------------------------------------------------------------------------------- the page's files
def _read(name: str) -> str:
    return resources.files("convret").joinpath("resources", "page", name).read_text(encoding="utf-8")


def page_router(auth_required: bool) -> APIRouter:
    """The routes of the page's own files (not in the OpenAPI schema: they are no API). The HTML is told whether
    the server asks for a key (its only server-side content), so that the page asks for one only then."""
    html = _read("page.html").replace("{{auth}}", "required" if auth_required else "none")
    files = {"page.js": _read("page.js"), "page.css": _read("page.css")}
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def page() -> Response:
        return Response(html, media_type=_FILES["page.html"], headers=_HEADERS)

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in files:
            return JSONResponse({"detail": "no such file"}, 404)
        return Response(files[name], media_type=_FILES[name], headers=_HEADERS)

    return router


# ---------------------------------------------------------------------------------------------- the data it loads
eval_router = APIRouter()
_RESPONSES = {401: {"model": ErrorOut, "description": "missing or wrong API key"},
              404: {"model": ErrorOut, "description": "not in the evaluation file or its qrels, or none was given"},
              422: {"model": ValidationErrorOut, "description": "a missing or invalid parameter"},
              503: {"model": ErrorOut, "description": "overloaded, timed out or shutting down: retry after the "
                                                     "Retry-After header's seconds"}}


def _evalset(request: Request) -> EvalSet:
    evalset = request.app.state.convret.evalset
    if evalset is None:
        raise HTTPException(404, "no evaluation file: start convret serve with --eval-file FILE")
    return evalset


@eval_router.get("/v1/eval/sessions", response_model=EvalSessionsOut, responses=_RESPONSES)
async def eval_sessions(request: Request) -> EvalSessionsOut:
    """The conversations of the server's ``--eval-file`` (``loaded`` false and none without it)."""
    evalset = request.app.state.convret.evalset
    if evalset is None:
        return EvalSessionsOut(loaded=False, qrels=False, sessions=[])
    return EvalSessionsOut(loaded=True, qrels=evalset.qrels is not None,
                           sessions=[EvalSessionSummary(conv_id=conv_id, turns=len(turns), first_query=turns[0].query)
                                     for conv_id, turns in evalset.conversations.items()])


@eval_router.get("/v1/eval/session", response_model=EvalSessionOut, responses=_RESPONSES)
async def eval_session(request: Request, conv_id: str = Query(..., description="a conv_id of /v1/eval/sessions")
                       ) -> EvalSessionOut:
    """One conversation of ``--eval-file``: per turn its query id, the session before it and its query."""
    turns = _evalset(request).conversations.get(conv_id)
    if turns is None:
        raise HTTPException(404, "conv_id: no such conversation in the evaluation file")
    return EvalSessionOut(conv_id=conv_id, turns=[
        EvalTurnOut(qid=t.qid, turn_id=str(t.turn_id), query=t.query, rewrite=t.rewrite,
                    history=[TurnOut(role=h.role, text=h.text) for h in t.history]) for t in turns])


@eval_router.get("/v1/qrels", response_model=QrelsOut, responses=_RESPONSES)
async def qrels(request: Request, qid: str = Query(..., description="a query id of the evaluation file")
                ) -> QrelsOut:
    """The judged passages of one query of the evaluation file (``{docid: relevance}``; empty for a query the
    qrels do not judge)."""
    evalset = _evalset(request)
    if evalset.qrels is None:
        raise HTTPException(404, "no qrels: start convret serve with --qrels FILE (beside --eval-file)")
    if qid not in evalset.qids:
        raise HTTPException(404, "qid: no such query in the evaluation file")
    return QrelsOut(qid=qid, judgments=evalset.qrels.get(qid, {}))
