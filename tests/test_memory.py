"""convret.tune_cpu_malloc: glibc's mmap threshold is fixed, so freed activations leave the heap."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import convret
from convret.memory import ENV_VARIABLE, MAX_MMAP_THRESHOLD, _glibc_mallopt

glibc_only = pytest.mark.skipif(_glibc_mallopt() is None or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallopt, mallinfo2)")

# Free an 18 MiB block (mmapped at first), then allocate 8 MiB and report whether glibc mapped it. With glibc's
# defaults the free raised the dynamic threshold to 18 MiB, so the 8 MiB block comes from the heap.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    import convret

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = None if sys.argv[1] == "default" else convret.tune_cpu_malloc(2**20, override_env=sys.argv[1] == "override")
    first = torch.rand(18 * 2**18)  # 18 MiB of fp32, random: never test on zeros
    del first
    mapped_before = libc.mallinfo2().hblkhd
    second = torch.rand(8 * 2**18)
    mapped_growth = libc.mallinfo2().hblkhd - mapped_before
    print(json.dumps({"applied": applied, "mapped_growth": mapped_growth, "sum": float(second.sum())}))
""")


def run_probe(mode: str, **env_extra: str) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != ENV_VARIABLE}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_default_glibc_keeps_mid_size_blocks_in_the_heap():
    """The premise: without the setting, an 8 MiB tensor allocated after an 18 MiB one was freed is not mapped."""
    out = run_probe("default")
    assert out["mapped_growth"] < 8 * 2**20


@glibc_only
def test_tuned_malloc_maps_blocks_above_the_threshold():
    out = run_probe("tuned")
    assert out["applied"] is True
    assert out["mapped_growth"] >= 8 * 2**20


@glibc_only
def test_environment_variable_wins_unless_overridden():
    env = {ENV_VARIABLE: str(16 * 2**20)}  # a fixed 16 MiB threshold: the 8 MiB block comes from the heap
    kept = run_probe("tuned", **env)
    assert kept["applied"] is False and kept["mapped_growth"] < 8 * 2**20
    overridden = run_probe("override", **env)
    assert overridden["applied"] is True and overridden["mapped_growth"] >= 8 * 2**20


@pytest.mark.parametrize("bad", [0, -1, MAX_MMAP_THRESHOLD + 1])
def test_rejects_thresholds_glibc_would_refuse(bad):
    with pytest.raises(ValueError, match="mmap_threshold"):
        convret.tune_cpu_malloc(bad)


@pytest.mark.parametrize("bad", [1.5, "1M", True])
def test_rejects_non_integer_thresholds(bad):
    with pytest.raises(TypeError, match="mmap_threshold"):
        convret.tune_cpu_malloc(bad)
