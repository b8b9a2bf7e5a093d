"""Id files: the one format of the id lists that go with vectors (an embedding shard's ``part-N.ids``, an
index's ``ids.txt``, the BM25 miner's saved index), written and read here only.

The format: UTF-8, one id per line, every line (the last one too) ended by a line feed ``\\n``; line i holds
the id of row i. Only ``\\n`` separates ids: the reader splits on it and on nothing else (``str.splitlines()``
would also split on ``\\x0b \\x0c \\x1c \\x1d \\x1e \\x85 \\u2028 \\u2029``, which are ordinary characters of an id
here).

What the format cannot hold is refused by the writer, naming the id and where it came from (the input file and
line when the caller knows them):

- a line feed ``\\n`` (it would end the line);
- a carriage return ``\\r``: every text-mode reader (Python's ``open()``, most editors and line tools) reads it as
  a line end, so such a file would not read back as written outside convret either;
- a lone surrogate (``"\\ud800"``, which a JSON ``\\ud800`` escape produces): it has no UTF-8 encoding.

The reader accepts exactly what the writer writes: a file that is not valid UTF-8, holds a ``\\r`` (converted to
CRLF line ends) or does not end with ``\\n`` (cut short) is an error naming the file and the line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .._io import atomic_write

__all__ = ["IdFileError", "id_problem", "check_id", "write_ids", "read_ids", "iter_ids", "count_ids",
           "concatenate_ids"]

_BLOCK = 1 << 20


class IdFileError(ValueError):
    """An id the id-file format cannot hold, or an id file that was not written by :func:`write_ids`."""


def id_problem(ident: str) -> str | None:
    """Why ``ident`` cannot be a line of an id file, or ``None`` when it can."""
    if not isinstance(ident, str):
        return f"is a {type(ident).__name__}, not a str"
    if "\n" in ident:
        return "contains a line feed (\\n)"
    if "\r" in ident:
        return "contains a carriage return (\\r), which text-mode readers take for a line end"
    if not ident.isascii():
        try:
            ident.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (e.g. from a JSON \\ud800 escape), which has no UTF-8 encoding"
    return None


def check_id(ident: str, where: str | Callable[[], str]) -> None:
    """Raise :class:`IdFileError` when ``ident`` cannot be written to an id file. ``where``: where the id came
    from (``"collection.jsonl:12"``), or a function giving it (called only on an error)."""
    problem = id_problem(ident)
    if problem is not None:
        place = where() if callable(where) else where
        raise IdFileError(f"{place}: id {ident!r} {problem}: convret's id files hold one id per line; change "
                          "the id in the input")


def write_ids(path: str | os.PathLike, ids: Iterable[str], where: Callable[[int], str] | None = None) -> int:
    """Write ``ids`` to the id file ``path`` atomically; returns how many. An id the format cannot hold is an
    :class:`IdFileError` naming it and ``where(i)`` (where the i-th id came from; default ``"id i"``, 0-based) and
    nothing is written."""
    count = 0
    with atomic_write(path, "wb", encoding=None) as handle:
        block: list[bytes] = []
        for count, ident in enumerate(ids, 1):
            if id_problem(ident) is not None:
                check_id(ident, where(count - 1) if where is not None else f"ids[{count - 1}]")
            block.append(ident.encode("utf-8"))
            if len(block) == 4096:
                handle.write(b"\n".join(block) + b"\n")
                block = []
        if block:
            handle.write(b"\n".join(block) + b"\n")
    return count


def _decode(path: Path, line: int, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = line + data.count(b"\n", 0, error.start)
        raise IdFileError(f"{path}:{bad}: not UTF-8 ({error.reason} at byte {error.start}): not an id file "
                          "written by convret") from None
    if "\r" in text:
        bad = line + text.count("\n", 0, text.index("\r"))
        raise IdFileError(f"{path}:{bad}: a carriage return (\\r): the file was converted to CRLF line ends "
                          "(convert it back, e.g. dos2unix) or not written by convret")
    return text


def iter_ids(path: str | os.PathLike, block_size: int = _BLOCK) -> Iterator[str]:
    """The ids of ``path`` in order, streamed (memory: one block, not the file)."""
    path = Path(path)
    line, pending = 1, b""
    try:
        with open(path, "rb") as handle:
            while True:
                block = handle.read(block_size)
                if not block:
                    break
                data = pending + block
                end = data.rfind(b"\n") + 1  # a UTF-8 sequence never contains the byte 0x0A: cut there
                pending = data[end:]
                if end:
                    lines = _decode(path, line, data[:end]).split("\n")[:-1]
                    line += len(lines)
                    yield from lines
    except OSError as error:
        raise IdFileError(f"{path}: unreadable id file ({error})") from error
    if pending:
        raise IdFileError(f"{path}:{line}: the last line does not end with a line feed: the file was cut short "
                          "or not written by convret")


def read_ids(path: str | os.PathLike) -> list[str]:
    """The ids of ``path``, as :func:`write_ids` wrote them."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IdFileError(f"{path}: unreadable id file ({error})") from error
    if data and not data.endswith(b"\n"):
        lines = data.count(b"\n")
        raise IdFileError(f"{path}:{lines + 1}: the last line does not end with a line feed: the file was cut short "
                          "or not written by convret")
    return _decode(path, 1, data).split("\n")[:-1]


def count_ids(path: str | os.PathLike) -> int:
    """How many ids ``path`` holds (its line feeds), without decoding it."""
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(_BLOCK), b""))


def concatenate_ids(sources: Sequence[str | os.PathLike], path: str | os.PathLike) -> int:
    """Write the id files ``sources`` one after the other into the id file ``path`` (atomically); returns the
    number of ids. Each source is checked as :func:`read_ids` checks it (a source cut short would otherwise
    merge its last id with the next file's first)."""
    total = 0
    with atomic_write(path, "wb", encoding=None) as out:
        for source in sources:
            source = Path(source)
            line, pending = 1, b""
            try:
                with open(source, "rb") as handle:
                    for block in iter(lambda: handle.read(_BLOCK), b""):
                        data = pending + block
                        end = data.rfind(b"\n") + 1
                        pending = data[end:]
                        if end:
                            _decode(source, line, data[:end])
                            line += data.count(b"\n", 0, end)
                        out.write(block)
            except OSError as error:
                raise IdFileError(f"{source}: unreadable id file ({error})") from error
            if pending:
                raise IdFileError(f"{source}:{line}: the last line does not end with a line feed: the file was cut "
                                  "short or not written by convret")
            total += line - 1
    return total
