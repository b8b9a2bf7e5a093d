"""convret._io: atomic writes leave permissions as a plain open / mkdir would (the umask's, not 0600 / 0700)."""
from __future__ import annotations

import os
import stat

import pytest


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_and_directory_respect_the_umask(tmp_path, umask, mask):
    from convret._io import atomic_directory, atomic_write, current_umask

    umask(mask)
    assert current_umask() == mask
    with atomic_write(tmp_path / "file.txt") as handle:
        handle.write("x")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "inside.txt").write_text("y")
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("z")
    plain_dir.mkdir()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "file.txt") == mode(plain_file) == 0o666 & ~mask
    assert mode(tmp_path / "out") == mode(plain_dir) == 0o777 & ~mask
    assert mode(tmp_path / "out" / "inside.txt") == 0o666 & ~mask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    from convret._io import atomic_write

    umask(0o022)
    path = tmp_path / "kept.txt"
    path.write_text("old")
    path.chmod(0o640)
    with atomic_write(path) as handle:
        handle.write("new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640
