"""Host memory for CPU training: large activation blocks without glibc's fragmentation or page faults.

glibc's ``malloc`` serves a block from ``mmap`` when it is at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at
start) and returns it to the OS on ``free``. But the threshold is dynamic: each time a mmapped block of up to
32 MiB is freed, the threshold rises to that block's size. In a training step the first freed activation
(a ``[tokens, hidden]`` hidden state, say 18 MiB) lifts it, and from then on every activation of that size or
smaller lives in the heap. The forward pass allocates them in one order and the backward pass frees them in
another, so the heap grows around holes it cannot give back, and those holes stay resident. Blocks above
32 MiB are always mapped afresh, and every page of a fresh mapping is faulted and zero-filled again.

Two remedies, both process-wide and opt-in (convret never changes the allocator on import; ``convret train``
turns the first one on for CPU runs, see :func:`enable_for_training`):

- :func:`enable_cpu_caching_allocator` (needs the native extension): torch's CPU blocks of 1 MiB or more are
  served from blocks freed earlier, by size class, and mapped memory grows only when little is cached.
  A training step allocates the same few sizes again and again, so it runs with neither holes nor page
  faults.
- :func:`tune_cpu_malloc` (any glibc): fix the mmap threshold, so freed blocks go back at once. Same memory
  saving, but every large allocation is a fresh, page-faulted mapping, so steps get slower.

Measured effect on a CSIT training step (peak RSS and step time under each): docs/hf.md, "Benchmark".
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Callable, NamedTuple

import torch

# mallopt parameter number, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
# glibc refuses thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit
MAX_MMAP_THRESHOLD = 32 * 2**20
DEFAULT_MMAP_THRESHOLD = 2**20
ENV_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
DEFAULT_MIN_BLOCK_BYTES = 2**20
DEFAULT_SLACK_BYTES = 256 * 2**20

__all__ = [
    "CachingAllocatorStats", "cpu_caching_allocator_stats", "disable_cpu_caching_allocator",
    "empty_cpu_cache", "enable_cpu_caching_allocator", "enable_for_training", "tune_cpu_malloc",
]


# ------------------------------------------------------------------------------ caching allocator
class CachingAllocatorStats(NamedTuple):
    """Counters of the caching CPU allocator (bytes are rounded up to size classes)."""

    live_bytes: int  # in blocks held by tensors
    cached_bytes: int  # in freed blocks kept for reuse
    peak_mapped_bytes: int  # live + cached, at its highest since the last empty_cpu_cache()
    hits: int  # requests served from the cache
    misses: int  # requests that mapped a new block
    released_bytes: int  # unmapped again so far
    active: bool


def enable_cpu_caching_allocator(
    min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES, slack_bytes: int = DEFAULT_SLACK_BYTES
) -> bool:
    """Serve torch's CPU allocations of ``min_block_bytes`` or more from a cache of freed blocks.

    Blocks are rounded up to size classes (8 per power of two, at most 12.5 % slack) and mapped straight from
    the OS. A request takes the most recently freed cached block of its class or of the next class up (at
    most 1/8 larger), never a larger one; only when none fits is a new block mapped, and before that the
    least recently freed cached blocks are unmapped until as many bytes as the request went back or at most
    ``slack_bytes`` stay cached. A repeating training step finds its blocks in the cache, resident and
    without page faults. Smaller requests go to torch's default allocator.

    Bound: the mapped bytes (``peak_mapped_bytes``, and so this allocator's share of the RSS) never exceed
    the peak of the live blocks' bytes plus ``slack_bytes``; a live block is at most (9/8)^2 = 1.27 times its
    request (class rounding, then lending one class up; requests of 32 KiB or more), so
    ``peak mapped <= 1.27 * peak live tensor bytes + slack_bytes``.

    Process-wide and opt-in: call it first thing in a CPU training process. Tensors allocated before keep
    their own deleter, so enabling (or :func:`disable_cpu_caching_allocator`) at any point, any number of
    times, is safe. The switch uses c10's highest allocator priority (c10 has no way to read the current one),
    so an allocator another library installs later at a lower priority does not replace this one or the
    allocator :func:`disable_cpu_caching_allocator` restores.

    Args:
        min_block_bytes: smallest request the cache serves (at least one page).
        slack_bytes: cached bytes a miss may leave in place before it maps more memory. 0 keeps the peak at
            the live blocks' peak but makes steps whose size mix changes map blocks again.

    Returns:
        True when this call installed the allocator, False when it was active already (the new settings
        apply either way).

    Raises:
        RuntimeError: the native extension (which holds the allocator) is not built; see
            ``convret.backend_info()``. :func:`tune_cpu_malloc` works without it.

    Example::

        import convret
        convret.enable_cpu_caching_allocator()  # first thing in a CPU training script
    """
    _check_bytes("min_block_bytes", min_block_bytes, minimum=1)
    _check_bytes("slack_bytes", slack_bytes, minimum=0)
    return bool(_native_ops().caching_allocator_enable(min_block_bytes, slack_bytes))


def disable_cpu_caching_allocator() -> None:
    """Give torch its previous CPU allocator back and unmap every cached block. Live blocks stay valid and
    are unmapped when their tensors are freed."""
    _native_ops().caching_allocator_disable()


def empty_cpu_cache() -> int:
    """Unmap every cached (free) block and restart ``peak_mapped_bytes`` from what stays mapped (the live
    blocks); returns the bytes given back. The allocator stays active."""
    return int(_native_ops().caching_allocator_empty_cache())


def cpu_caching_allocator_stats() -> CachingAllocatorStats:
    live, cached, peak, hits, misses, released, active = _native_ops().caching_allocator_stats()
    return CachingAllocatorStats(live, cached, peak, hits, misses, released, bool(active))


def enable_for_training(enabled: bool, device: torch.device | str) -> Callable[[], None]:
    """``convret train``'s allocator: on a CPU run, :func:`enable_cpu_caching_allocator` unless ``enabled`` is
    False (``--cpu_caching_allocator false``), so that what ships is what ``convret bench step``'s "convret as
    shipped" row measures. Nothing on other devices; a warning (and nothing else) when the native extension is
    not built. Returns the function that undoes it: it disables the cache if this call installed it."""
    if not enabled or torch.device(device).type != "cpu":
        return lambda: None
    from .ops.session_attention.cpu import _native, native_available

    if not native_available():
        warnings.warn(f"the CPU caching allocator stays off: {_native.reason}", stacklevel=2)
        return lambda: None
    return disable_cpu_caching_allocator if enable_cpu_caching_allocator() else (lambda: None)


def _native_ops():
    from .ops.session_attention.cpu import _native, native_available

    if not native_available():
        raise RuntimeError(f"the caching CPU allocator is part of the native extension, which is not available: "
                           f"{_native.reason}")
    return torch.ops.convret_cpu


def _check_bytes(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum} .. {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bound} bytes, got {value}")


# ------------------------------------------------------------------------------ glibc mmap threshold
def tune_cpu_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, *, override_env: bool = False) -> bool:
    """Serve every allocation of ``mmap_threshold`` bytes or more from ``mmap`` (glibc ``M_MMAP_THRESHOLD``).

    Fixing the threshold also turns glibc's dynamic adjustment off: freed activations go back to the OS at
    once instead of staying resident in a fragmented heap. The price is page faults, since every large
    allocation is a fresh mapping. Equal to ``MALLOC_MMAP_THRESHOLD_=...`` in the environment; needs no
    native extension. :func:`enable_cpu_caching_allocator` saves the same memory without the faults.

    Args:
        mmap_threshold: bytes, 1 .. 32 MiB (glibc's limit).
        override_env: a ``MALLOC_MMAP_THRESHOLD_`` set in the environment wins unless this is True.

    Returns:
        True when the setting took effect; False outside glibc, or when the environment variable was left
        in charge.
    """
    _check_bytes("mmap_threshold", mmap_threshold, minimum=1, maximum=MAX_MMAP_THRESHOLD)
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
