"""pytest-benchmark micro-suite of convret's ops (not collected by ``pytest tests``; run it with ``make bench-micro``).

Options added here:
    --micro-smoke   run every "csit" case at the small shape (CI's ``--benchmark-disable`` pass; also set by
                    ``CONVRET_MICRO_SMOKE=1``). Test ids stay the same, so every benchmark body still runs once.
"""
from __future__ import annotations

import os

import pytest
import torch

import convret
from micro_common import MicroRun

RUN_KEY = pytest.StashKey[MicroRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--micro-smoke", action="store_true", default=os.environ.get("CONVRET_MICRO_SMOKE", "0") == "1",
        help="convret micro-benchmarks: run the CSIT-shape cases at the small shape (for the CI smoke pass)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUN_KEY] = MicroRun(smoke=config.getoption("--micro-smoke"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = convret.backend_info()
    return [
        f"convret micro-benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"backends {convret.available_backends()}, cpu backend {info['implementation']}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}, "
        f"smoke {config.stash[RUN_KEY].smoke}",
    ]


@pytest.fixture(scope="session")
def micro(pytestconfig: pytest.Config) -> MicroRun:
    """The run's shared state: smoke flag, GEMM ceilings, medians for the in-run speed-ups."""
    return pytestconfig.stash[RUN_KEY]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    info = convret.backend_info()
    machine_info["convret"] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_backend": info["implementation"],
        "blas": info.get("blas"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "smoke": config.stash[RUN_KEY].smoke,
    }


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash[RUN_KEY]
    if not run.speedups and not run.missing_peers:
        return
    write = terminalreporter.write_line
    terminalreporter.section("convret speed-ups over the peers, in-run medians (peer median / convret median)")
    for group, entries in sorted(run.speedups.items()):
        for entry, ratios in entries.items():
            if ratios:
                shown = ", ".join(f"{peer} {ratio:.2f}x" for peer, ratio in sorted(ratios.items()))
                write(f"{group:<44} {entry:<18} {shown}")
    for missing in run.missing_peers:
        write(f"{missing}: no peer measured earlier in this run (deselected?), no speed-up recorded")
