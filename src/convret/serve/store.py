"""The passage store: the collection's texts in one SQLite file beside the index, read in place.

The service answers every hit with its passage's text and title. Holding the collection in a dict costs about
690 bytes per 500-character passage (26 GB at 38 M passages); the store keeps them on disk and reads only the
hits' rows, so the service's memory does not grow with the collection's text.

Why SQLite (the standard library's ``sqlite3``) and not memory-mapped Arrow: the service looks passages up by
id, a few at a time. SQLite's B-tree index on ``id`` answers that from disk; a memory-mapped Arrow table is
addressed by row number and would need an id -> row map in memory (the cost the store removes) or a second,
sorted file and a search of our own. Building is a stream of inserts and one ``CREATE UNIQUE INDEX`` (an
external sort), so a duplicate id is caught on disk, without holding the ids in memory. It is one file, renamed
into place when complete, and it adds no dependency to ``convret serve``.

The store records what it was built from: the collection file's identity (size, modification time and a hash of
three 1 MiB samples, as ``convret encode`` fingerprints a large checkpoint file) and a digest of the index's
passage ids, all of which it holds. :func:`open_store` reuses a store that matches both, rebuilds a store of its
own that does not, and refuses a file at that path that it did not write.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .._io import atomic_file

__all__ = ["PassageStore", "open_store", "build_store", "collection_identity", "ids_digest", "STORE_NAME",
           "StoreError"]

STORE_NAME = "passages.sqlite"
FORMAT = "convret-passage-store/1"
_INSERT_CHUNK = 2_000  # rows per executemany: a few MB of text at most in memory
_LOOKUP_CHUNK = 500  # ids per query (SQLite's host-parameter limit is 32,766 since 3.32, 999 before)


class StoreError(ValueError):
    """A passage store that cannot be built, opened or used as asked (names the file and the fix)."""


def collection_identity(path: str | os.PathLike) -> dict:
    """What identifies the collection file: size, modification time and a hash of three 1 MiB samples (start,
    middle, end); a file edited in place changes at least its time."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for offset in sorted({0, max(0, stat.st_size // 2 - (1 << 19)), max(0, stat.st_size - (1 << 20))}):
            handle.seek(offset)
            digest.update(handle.read(1 << 20))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha1": digest.hexdigest()}


def ids_digest(ids: Sequence[str]) -> str:
    """A digest of the index's passage ids, in order (the store is built for them)."""
    digest = hashlib.sha1(str(len(ids)).encode())
    for start in range(0, len(ids), 65536):
        digest.update("\n".join(ids[start : start + 65536]).encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


class PassageStore:
    """A built store, opened read-only: ``store.get(ids) -> [(text, title)]``.

    One connection, opened once (so that a store replaced on disk later is not mixed with this one) and shared
    by threads under a lock: a lookup of a request's hits takes microseconds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None:
            raise StoreError(f"{self.path}: not a passage store written by convret serve")
        self.meta = meta
        self._connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                           check_same_thread=False)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.meta["passages"])

    def get(self, ids: Sequence[str]) -> list[tuple[str, str]]:
        """``(text, title)`` of each id, in order. Raises ``KeyError`` for an id the store does not hold."""
        found: dict[str, tuple[str, str]] = {}
        wanted = list(dict.fromkeys(ids))
        with self._lock:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for pid, text, title in self._connection.execute(
                        f"SELECT id, text, title FROM passages WHERE id IN ({marks})", chunk):
                    found[pid] = (text, title)
        return [found[pid] for pid in ids]

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def read_meta(path: str | os.PathLike) -> dict | None:
    """The store's metadata, or ``None`` when ``path`` is not a store that convret wrote."""
    try:
        connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:  # not a database, or not ours
        return None
    finally:
        connection.close()
    try:
        meta = {key: json.loads(value) for key, value in meta.items()}
    except (TypeError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def open_store(path: str | os.PathLike, collection: str | os.PathLike, ids: Sequence[str], fmt: str = "auto",
               log: Callable[[str], object] = lambda message: None) -> PassageStore:
    """The store at ``path`` for ``collection`` and the index's passage ``ids``: reused when it was built from
    this collection file for these ids, (re)built otherwise.

    Raises:
        StoreError: ``path`` holds a file that is not a convret passage store (it is never overwritten), the
            collection holds a duplicate id (named with both lines) or lacks passages of the index, or the
            store cannot be written there.
    """
    path, collection = Path(path), Path(collection)
    if not collection.is_file():
        raise StoreError(f"{collection}: no such collection file")
    identity, digest = collection_identity(collection), ids_digest(ids)
    if path.exists():
        meta = read_meta(path)
        if meta is None:
            raise StoreError(f"{path}: exists but is not a passage store written by convret serve; it is left "
                             "alone: pass --passage-store with another path (or move the file away)")
        if meta["collection"] == identity and meta["ids"] == digest:
            return PassageStore(path)
        why = "the collection file changed" if meta["collection"] != identity else "the index's passage ids changed"
        log(f"passage store {path}: {why} since it was built; rebuilding it")
    else:
        log(f"passage store {path}: building it from {collection} (once; later starts reuse it)")
    build_store(path, collection, ids, fmt=fmt, identity=identity, digest=digest)
    return PassageStore(path)


def build_store(path: str | os.PathLike, collection: str | os.PathLike, ids: Sequence[str], fmt: str = "auto",
                identity: dict | None = None, digest: str | None = None) -> None:
    """Write the store of ``collection`` for the index's ``ids`` to ``path`` atomically (a temporary file in the
    same directory, renamed into place when complete; permissions ``0o666`` less the umask)."""
    from ..data import read_collection
    from ..data.readers import ReadReport

    path, collection = Path(path), Path(collection)
    identity = identity or collection_identity(collection)
    digest = digest or ids_digest(ids)
    try:
        with atomic_file(path) as tmp:
            connection = sqlite3.connect(tmp)
            try:
                report = ReadReport()
                passages = read_collection(collection, format=fmt, strict=True, report=report)
                count = _fill(connection, ((p.id, p.title or "", p.text, report.line) for p in passages))
                if count == 0:
                    raise StoreError(f"{collection}: empty collection (no passages)")
                _index_ids(connection, collection)
                _check_covers(connection, collection, ids)
                meta = {"format": FORMAT, "collection": identity, "ids": digest, "passages": count,
                        "source": str(collection.resolve())}
                connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                connection.executemany("INSERT INTO meta VALUES (?, ?)",
                                       [(key, json.dumps(value)) for key, value in meta.items()])
                connection.commit()
            finally:
                connection.close()
    except (PermissionError, sqlite3.OperationalError) as error:
        raise StoreError(f"{path}: cannot write the passage store there ({error}); pass --passage-store with a "
                         "writable path") from None


def _fill(connection: sqlite3.Connection, rows: Iterable[tuple[str, str, str, int]]) -> int:
    connection.execute("PRAGMA journal_mode=OFF")  # a failed build is deleted, never recovered
    connection.execute("PRAGMA synchronous=OFF")  # flushed once, before the rename
    connection.execute("CREATE TABLE passages (id TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL, "
                       "line INTEGER NOT NULL)")
    count, chunk = 0, []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _INSERT_CHUNK:
            connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", chunk)
            count += len(chunk)
            chunk = []
    connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", chunk)
    return count + len(chunk)


def _index_ids(connection: sqlite3.Connection, collection: Path) -> None:
    try:
        connection.execute("CREATE UNIQUE INDEX passages_id ON passages (id)")
    except sqlite3.IntegrityError:
        pid = connection.execute("SELECT id FROM passages GROUP BY id HAVING count(*) > 1 LIMIT 1").fetchone()[0]
        lines = [line for (line,) in connection.execute(
            "SELECT line FROM passages WHERE id = ? ORDER BY rowid LIMIT 2", (pid,))]
        raise StoreError(f"{collection}:{lines[1]}: duplicate passage id {pid!r} (first on line {lines[0]}): "
                         "passage ids must be unique") from None


def _check_covers(connection: sqlite3.Connection, collection: Path, ids: Sequence[str]) -> None:
    """Every passage of the index is in the collection (checked on disk: the ids go to a temporary table)."""
    connection.execute("CREATE TEMP TABLE wanted (id TEXT NOT NULL)")
    for start in range(0, len(ids), _INSERT_CHUNK):
        connection.executemany("INSERT INTO wanted VALUES (?)", ((i,) for i in ids[start : start + _INSERT_CHUNK]))
    missing_query = "FROM wanted WHERE NOT EXISTS (SELECT 1 FROM passages WHERE passages.id = wanted.id)"
    missing = connection.execute(f"SELECT count(*) {missing_query}").fetchone()[0]
    if missing:
        first = connection.execute(f"SELECT id {missing_query} LIMIT 1").fetchone()[0]
        raise StoreError(f"{collection}: {missing} passage ids of the index are not in the collection (first: "
                         f"{first!r}): pass the collection the index was built from")
    connection.execute("DROP TABLE wanted")
