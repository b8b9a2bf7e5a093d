"""Test-wide set-up.

Triton picks the interpreter when a kernel is decorated, so ``TRITON_INTERPRET=1`` must be set before any
``convret.kernels`` module is imported. Without a GPU, the Triton tests run on CPU tensors under the
interpreter (fp32 and fp16 only: bf16 ``tl.dot`` returns garbage in the Triton 3.9 interpreter).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Interpreter tests are slow: few, fixed-seed examples keep CI inside its budget; no per-example deadline.
settings.register_profile("convret", max_examples=10, deadline=None, derandomize=False, print_blob=True)
settings.load_profile("convret")


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_family(tmp_path_factory):
    """``model_family(name) -> Path``: the local model directory of a family of the model matrix
    (tests/_model_matrix.py), built once per test session."""
    from _model_matrix import build_family

    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(f"model-{name}"))
        return built[name]

    return get


def pytest_addoption(parser):
    parser.addoption("--engines", action="store_true", default=False,
                     help="also run the heavy distributed-engine cases (marker `engines`; make test-engines)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--engines"):
        return
    skip = pytest.mark.skip(reason="heavy engine case: run with `make test-engines` (pytest --engines)")
    for item in items:
        if item.get_closest_marker("engines") is not None:
            item.add_marker(skip)
