"""`make setup` installs once per environment: a stamp under build/ skips pip's 45-second no-op reinstall, and the
install runs again when its inputs change or `convret` does not import from the checkout. pip is stood in for
(`PIP='echo INSTALL'`), in a copy of the Makefile beside stand-in inputs."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


@pytest.fixture
def checkout(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "csrc/kernel.cpp", "src/convret/__init__.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    return tmp_path


def make_setup(checkout: Path, pythonpath: Path, **extra: str) -> str:
    argv = ["make", "--no-print-directory", "setup", f"PYTHON={sys.executable}", "PIP=echo INSTALL",
            *(f"{k}={v}" for k, v in extra.items())]
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, check=True).stdout


def test_installs_once_then_skips(checkout):
    first = make_setup(checkout, checkout / "src")
    assert "INSTALL install -q --no-build-isolation -e .[test]" in first
    stamps = list((checkout / "build").glob("setup-*.stamp"))
    assert len(stamps) == 1
    second = make_setup(checkout, checkout / "src")
    assert "INSTALL" not in second and "installed already" in second


def test_installs_again_when_an_input_changes(checkout):
    make_setup(checkout, checkout / "src")
    stamp, = (checkout / "build").glob("setup-*.stamp")
    now = time.time()
    os.utime(stamp, (now - 10, now - 10))
    os.utime(checkout / "csrc" / "kernel.cpp", (now - 5, now - 5))  # changed after the install
    assert "INSTALL install -q --no-build-isolation" in make_setup(checkout, checkout / "src")
    assert "installed already" in make_setup(checkout, checkout / "src")


def test_installs_again_when_convret_imports_from_elsewhere(checkout, tmp_path_factory):
    make_setup(checkout, checkout / "src")
    elsewhere = tmp_path_factory.mktemp("other") / "src"
    (elsewhere / "convret").mkdir(parents=True)
    (elsewhere / "convret" / "__init__.py").write_text("")
    assert "INSTALL install -q --no-build-isolation" in make_setup(checkout, elsewhere)


def test_other_pip_options_have_their_own_stamp(checkout):
    make_setup(checkout, checkout / "src")
    out = make_setup(checkout, checkout / "src", PIP_INSTALL_OPTS="-c pins.txt")
    assert "INSTALL install -q --no-build-isolation -e .[test] -c pins.txt" in out
    assert len(list((checkout / "build").glob("setup-*.stamp"))) == 2
