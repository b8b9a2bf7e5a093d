"""Authentication of ``convret serve``: API keys, each a tenant whose cached conversations are its own.

Clients send ``Authorization: Bearer KEY``. A key file holds one key per line (blank lines and ``#`` comments
ignored); every key is a tenant: the session cache is namespaced by it, so that a conversation id one client uses
never reuses (or reveals the length of) another tenant's cached session. Clients sharing a key share a namespace.

The middleware sits inside the CORS middleware: a browser's preflight (``OPTIONS`` with
``Access-Control-Request-Method``, which never carries ``Authorization``) is answered by CORS before any key is
asked for, and the CORS headers reach a 401 too, so that the page can read it.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Iterable

from ._asgi import reply

__all__ = ["ApiKeys", "Authentication", "read_api_keys", "MIN_KEY_CHARS", "TENANT", "AUTHENTICATED"]

MIN_KEY_CHARS = 16
TENANT = "convret.tenant"  # scope key: the caller's tenant label ("" on a server without keys)
AUTHENTICATED = "convret.authenticated"  # scope key: the caller sent a valid key, or the server has none


def read_api_keys(path: str) -> list[str]:
    """The keys in ``path``: one per line, surrounding whitespace stripped, blank lines and ``#`` comments
    ignored. Raises ``ValueError`` when unreadable, empty, or a key is short or holds whitespace."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--api-key-file {path}: cannot read it ({error})") from error
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"--api-key-file {path}:{number}: a key must be at least {MIN_KEY_CHARS} characters "
                             "without whitespace (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`)")
        keys.append(key)
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it (one key per line)")
    return list(dict.fromkeys(keys))


class ApiKeys:
    """The accepted keys and their tenant labels (a hash prefix: the label never reveals the key)."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [(key.encode(), hashlib.sha256(key.encode()).hexdigest()[:16]) for key in keys]
        if not self._keys:
            raise ValueError("no API key")

    def tenant(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The tenant of a request's ``Authorization: Bearer KEY`` header, or ``None``. Every key is compared
        in constant time, all of them whatever matches."""
        token = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
                break
        if token is None:
            return None
        found = None
        for key, label in self._keys:
            if hmac.compare_digest(token, key):
                found = label
        return found


class Authentication:
    """ASGI middleware: 401 without a valid key, except on ``open_paths`` (the health probe), which are told
    whether the caller is authenticated (``scope["convret.authenticated"]``). Every request's tenant is put in
    ``scope["convret.tenant"]``."""

    def __init__(self, app, keys: ApiKeys | None, open_paths: Iterable[str] = ("/healthz",)):
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tenant = "" if self.keys is None else self.keys.tenant(scope.get("headers") or [])
        scope[AUTHENTICATED] = tenant is not None
        scope[TENANT] = tenant or ""
        if tenant is None and scope.get("path", "") not in self.open_paths:
            return await reply(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)
