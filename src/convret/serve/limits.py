"""Per-request limits of ``convret serve`` (413 / 422 naming the limit) and the body-size middleware.

A body is read in chunks and refused (413) as soon as its declared ``Content-Length`` or the bytes received pass
``max_body_bytes``, before it is held whole; a body that is not UTF-8 is refused (400). So a request holds at most
``max_body_bytes`` of body (plus what it parses into), and the service at most ``--max-concurrent-requests`` such
requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ._asgi import reply

__all__ = ["Limits", "LimitError", "BodyLimit", "token_upper_bound"]


@dataclass
class Limits:
    """Per-request limits (413: body size and tokens; 422: counts and values)."""

    max_body_bytes: int = 1 << 20
    max_turns: int = 256
    max_text_chars: int = 32768
    max_tokens: int = 32768  # in the texts of one session or passage (before the model's truncation)
    max_top_k: int = 1000
    max_items: int = 256  # sessions + passages of one /v1/encode request


class LimitError(Exception):
    """A request over a limit or otherwise unusable: ``status`` (413 or 422), a message naming the limit, and
    the field it concerns (``loc``, as in a validation error)."""

    def __init__(self, status: int, message: str, loc: Sequence[str | int] = ("body",)):
        super().__init__(message)
        self.status = status
        self.message = message
        self.loc = list(loc)


def token_upper_bound(texts: list[str]) -> int:
    """An upper bound of the tokens any of the field's tokenizers makes of ``texts`` (no special tokens).

    Every token of a byte-level BPE (GPT-2, Llama 3, Qwen), a SentencePiece / Metaspace vocabulary with byte
    fallback (Llama 2, Mistral), WordPiece or Unigram covers at least one byte of the text as the tokenizer sees
    it; that text is at most 3x the UTF-8 bytes (a space becomes the 3-byte ``▁``) plus one prepended ``▁``.
    Checking the token limit against this bound first spares the server a second tokenisation of every
    ordinary request (the session is tokenised once more, through the chat template, to be encoded)."""
    return sum(3 * len(text.encode("utf-8")) + 3 for text in texts)


class BodyLimit:
    """ASGI middleware: reads a request body up to ``max_body_bytes`` (413 beyond), checks it is UTF-8 (400),
    then hands it on whole."""

    METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in self.METHODS:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await reply(send, 413, f"request body of {int(declared)} bytes exceeds the limit "
                                          f"max_body_bytes={self.limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await reply(send, 413, f"request body exceeds the limit max_body_bytes={self.limit}")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            return await reply(send, 400, f"request body is not valid UTF-8 (byte {error.start})")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
