"""What every reader shares: the bad-record exception, the file opener and the field helpers (``_``-private to
``convret.data``; the format modules and :mod:`convret.data.readers` use them)."""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from .records import ASSISTANT, USER, Passage, Turn

PathLike = str | os.PathLike


class _Bad(Exception):
    """Raised by a record parser: the record is malformed for ``reason``."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal  # the rest of the file cannot be read (a syntax error inside a JSON array)


def _open(path: PathLike, newline: str = ""):
    return open(path, "r", encoding="utf-8", newline=newline)


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str = "", optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise _Bad(f"{where or 'record'} must be a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise _Bad(f"missing field {key!r}" + (f" in {where}" if where else ""))
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, (int, str), (str, int)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"field {key!r}" + (f" in {where}" if where else "") +
                   f" must be {names}, got {type(value).__name__}")
    return value


def _text(obj: Any, key: str, where: str = "", optional: bool = False) -> str | None:
    value = _field(obj, key, str, where, optional)
    if value is None:
        return None
    if not value.strip():
        if optional:
            return None
        raise _Bad(f"empty text in field {key!r}" + (f" of {where}" if where else ""))
    return value


def _ident(obj: Any, key: str, where: str = "") -> str:
    value = _field(obj, key, (str, int), where)
    value = str(value).strip()
    if not value:
        raise _Bad(f"empty id in field {key!r}" + (f" of {where}" if where else ""))
    return value


def _unique_turns(turns: Sequence[Any], key: str) -> Iterator[tuple[str, Any, str]]:
    """``(where, turn, turn_id)`` of each element of a conversation's ``key`` list, its ``turn_id`` unique."""
    seen: set[str] = set()
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        turn_id = _ident(turn, "turn_id", where)
        if turn_id in seen:
            raise _Bad(f"duplicate turn_id {turn_id!r} in {where}")
        seen.add(turn_id)
        yield where, turn, turn_id


def _passage_obj(obj: Any, where: str, id_keys: Sequence[str] = ("docid", "id", "passage_id")) -> Passage:
    if not isinstance(obj, dict):
        raise _Bad(f"{where} must be a JSON object, got {type(obj).__name__}")
    key = next((k for k in id_keys if obj.get(k) is not None), None)
    if key is None:
        raise _Bad(f"missing field {id_keys[0]!r} in {where}")
    text_key = "text" if "text" in obj else "contents" if "contents" in obj else "text"
    return Passage(_ident(obj, key, where), _text(obj, text_key, where), _field(obj, "title", str, where, True) or "")


def _context_turns(obj: Any) -> list[Turn]:
    context = _field(obj, "Context", list, optional=True) or []
    turns = []
    for j, text in enumerate(context):
        if not isinstance(text, str):
            raise _Bad(f"Context[{j}] must be str, got {type(text).__name__}")
        if not text.strip():
            raise _Bad(f"empty text in Context[{j}]")
        turns.append(Turn(USER if j % 2 == 0 else ASSISTANT, text))
    return turns


def _str_list(obj: Any, key: str, where: str = "", allow_empty: bool = False) -> list[str]:
    """A list of texts (absent or null: empty); ``allow_empty``: empty strings are kept as ``""``."""
    values = _field(obj, key, list, where, optional=True) or []
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise _Bad(f"{key}[{j}]" + (f" in {where}" if where else "") + f" must be str, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise _Bad(f"empty text in {key}[{j}]" + (f" of {where}" if where else ""))
    return values
