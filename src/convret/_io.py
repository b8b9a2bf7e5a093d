"""Atomic writes: a reader never sees a half-written file or directory, whatever kills the writer.

Every file and directory convret produces (checkpoints, embeddings shards, indexes, runs, metrics, benchmark
results) is written under a temporary name in the same directory, flushed to disk, then renamed into place.
Permissions are those of a plain ``open`` / ``mkdir``: ``0o666`` / ``0o777`` less the process umask (``tempfile``
alone would leave ``0o600`` / ``0o700``, unreadable by the rest of a group sharing a cluster); a file that
replaces an existing one keeps that file's permission bits, as ``open(path, "w")`` does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_file", "atomic_directory", "fsync_tree", "current_umask"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp: write the file tmp``: for writers that need a path rather than a handle
    (a database); ``path`` appears complete or not at all, as with :func:`atomic_write`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            permissions = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            permissions = 0o666 & ~current_umask()
        os.fchmod(fd, permissions)
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears complete or not at all (an existing
    file is replaced only when the block succeeds)."""
    with atomic_file(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp: write files into tmp``: ``out`` appears complete or not at all.

    The temporary directory ``.{name}.tmp-*`` sits beside ``out``; a crash leaves only that behind, which
    readers ignore. With ``overwrite`` an existing ``out`` is replaced (moved aside, then deleted after the
    rename); without it an existing ``out`` is an error."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere set and restored
    at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under ``root`` to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(directory)


def _fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
