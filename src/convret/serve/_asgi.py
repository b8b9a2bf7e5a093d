"""What the ASGI middlewares of ``convret serve`` share: answering from a middleware."""
from __future__ import annotations

import json

__all__ = ["reply"]


async def reply(send, status: int, detail: str, headers: list | None = None) -> None:
    """Answer ``{"detail": detail}`` with ``status`` straight from a middleware."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
