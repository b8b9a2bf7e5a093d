"""Host-memory setting for CPU training: keep glibc from holding freed activations.

glibc's ``malloc`` serves a block from ``mmap`` when it is at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at
start) and returns it to the OS on ``free``. But the threshold is dynamic: each time a mmapped block of up to
32 MiB is freed, the threshold rises to that block's size. In a training step the first freed activation
(a ``[tokens, hidden]`` hidden state, say 18 MiB) lifts it, and from then on every activation of that size or
smaller lives in the heap. The forward pass allocates them in one order and the backward pass frees them in
another, so the heap grows around holes it cannot give back, and those holes stay resident: in the CSIT-step
benchmark (``bench/bench_csit_step.py``) about 0.9 GB on top of 2.2 GB of live memory.

:func:`tune_cpu_malloc` fixes the threshold (which also turns the dynamic adjustment off), so that every
block from ``mmap_threshold`` up is mapped on allocation and unmapped on free, whatever was freed before.
The price is time: a fresh mapping is zero-filled page by page by the kernel on first touch, where a reused
heap block is not (in that benchmark the convret step takes 5.2 s instead of 3.9 s). It is a memory / time
trade-off, so it is opt-in: process-wide, like ``MALLOC_MMAP_THRESHOLD_=...`` in the environment (which it
equals), and never done on import. Call it once at the start of a CPU training process that is short of
memory. On a GPU it changes nothing that matters (activations live in CUDA memory); outside glibc it does
nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter number, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
# glibc refuses thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit
MAX_MMAP_THRESHOLD = 32 * 2**20
DEFAULT_MMAP_THRESHOLD = 2**20
ENV_VARIABLE = "MALLOC_MMAP_THRESHOLD_"

__all__ = ["tune_cpu_malloc"]


def tune_cpu_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, *, override_env: bool = False) -> bool:
    """Serve every allocation of ``mmap_threshold`` bytes or more from ``mmap`` (glibc ``M_MMAP_THRESHOLD``).

    Freed activations then go back to the OS at once instead of staying resident in a fragmented heap. In
    the CSIT-step benchmark this lowers convret's peak RSS from 3.1 to 2.2 GB, and the step takes about a
    third longer (page faults on fresh mappings).

    Args:
        mmap_threshold: bytes, 1 .. 32 MiB (glibc's limit). 1 MiB (default) maps every tensor of 256k fp32
            values or more; smaller tensors stay in the heap, where fragmentation costs little.
        override_env: a ``MALLOC_MMAP_THRESHOLD_`` set in the environment wins unless this is True.

    Returns:
        True when the setting took effect; False outside glibc, or when the environment variable was left
        in charge.

    Example::

        import convret
        convret.tune_cpu_malloc()  # first thing in a CPU training script
    """
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int):
        raise TypeError(f"mmap_threshold must be an int (bytes), got {type(mmap_threshold).__name__}")
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in 1 .. {MAX_MMAP_THRESHOLD} bytes (glibc's limit), "
                         f"got {mmap_threshold}")
    if ENV_VARIABLE in os.environ and not override_env:
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and other C libraries have no gnu_get_libc_version (musl's mallopt is a stub that does nothing)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
