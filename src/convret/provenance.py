"""What produced an output, and the one rule for writing into an output that already exists.

Every command records what its output came from (a *fingerprint*: the checkpoint's content identity, the inputs,
the settings that decide the result) and compares it before it writes into something that is already there:

- the same fingerprint: the output is the same computation, so it is resumed or replaced;
- another fingerprint: refused, naming what differs (``key: old -> new``), unless ``--overwrite``;
- nothing recorded (a file convret cannot attribute: a TREC run, someone else's directory): refused unless
  ``--overwrite``; convret never replaces what it cannot tell it wrote.

:func:`content_identity` is the one fingerprint of a checkpoint (or any file or directory) used by encode,
index, search, serve, mine, export, evaluate and the resume check of ``convret train``: a hash of the content, so
that a copied checkpoint keeps its identity and a retrained one at the same path does not.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["content_identity", "comparable", "fingerprint_difference", "check_output", "read_record",
           "OutputExistsError"]

_WHOLE_FILE = 32 << 20  # files up to this size are hashed whole; larger ones by their size and three samples
_SAMPLE = 1 << 20


class OutputExistsError(ValueError):
    """An output exists and was produced by something else (or by something convret cannot tell)."""


def content_identity(path: str | os.PathLike) -> str:
    """A content hash of a file or directory: relative file names, sizes and bytes (files over 32 MB by their
    size and three 1 MB samples: start, middle, end). A copy keeps the identity, a retrained checkpoint at the
    same path changes it. ``"unknown:PATH"`` for a path that holds no file (never equal to a real identity:
    see :func:`comparable`)."""
    path = Path(path)
    digest = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return f"unknown:{path}"
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size};".encode())
        with open(f, "rb") as handle:
            if size <= _WHOLE_FILE:  # in blocks: a 32 MB collection is not held whole to be hashed
                for block in iter(lambda: handle.read(_SAMPLE), b""):
                    digest.update(block)
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    handle.seek(offset)
                    digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:20]


def comparable(identity: Any) -> bool:
    """An identity two outputs can be compared by (not a model built in memory, not a missing path)."""
    return isinstance(identity, str) and bool(identity) and identity != "in-memory" \
        and not identity.startswith("unknown:")


def fingerprint_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A readable account of how ``old`` differs from ``new`` (``"key: old -> new; ..."``)."""
    if old is None:
        return "the shard records no fingerprint (written by an older convret, or interrupted)"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path`` where an output records what produced it (``None``: absent, unreadable or
    not an object)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_output(path: str | os.PathLike, expected: dict[str, Any], recorded: dict[str, Any] | None,
                 overwrite: bool, what: str, fix: str = "pass --overwrite to replace it, or write elsewhere") -> None:
    """The rule for writing ``what`` into ``path`` (module docstring). ``recorded``: the fingerprint the
    existing output records (``None``: it records none). Nothing to check when ``path`` does not exist, is an
    empty directory, or ``overwrite`` is set.

    Raises:
        OutputExistsError: naming ``path``, what differs, and ``fix``.
    """
    path = Path(path)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if recorded is None:
        raise OutputExistsError(f"{path} already exists and records nothing of what produced it (convret replaces "
                                f"{what} on its own only when it can tell it is the same computation); {fix}")
    if recorded != expected:
        raise OutputExistsError(f"{path} holds {what} of another model, input or setting "
                                f"({fingerprint_difference(recorded, expected)}); {fix}")
