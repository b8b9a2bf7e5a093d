"""Shapes, inputs and the in-run speed-up bookkeeping shared by the micro-benchmarks.

Only public convret APIs are used here, so the suite keeps working while the kernels change underneath.

In-run speed-up: every group runs its peers first and its convret entries last (the case lists are ordered
that way). :class:`MicroRun` keeps the median of every benchmark measured in this process; when a convret
entry finishes, it divides each peer's median by its own and writes the result into ``extra_info["speedup"]``.
Peer and convret are measured seconds apart in the same process, with the same inputs, so load from other jobs
on a shared machine moves both and mostly cancels in the ratio. ``compare_ratios.py`` checks these ratios from
one saved run to the next.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import convret

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SUMMARY = 3  # t, the summary tokens EMB_1..EMB_t


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class AttentionShape:
    """One session-attention problem: ``[B, Hq | Hkv, L, D]`` and the packed samples of every row."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    row: tuple[tuple[int, int, int], ...]  # (prefix_len, summary_len, response_len) per sample, every row alike
    seq_len: int

    def layout(self, device: torch.device | str = "cpu") -> convret.SessionLayout:
        return convret.SessionLayout.from_segments([list(self.row)] * self.batch, self.seq_len, device=device)

    def describe(self) -> dict[str, Any]:
        return {"B": self.batch, "Hq": self.q_heads, "Hkv": self.kv_heads, "D": self.head_dim,
                "L": self.seq_len, "samples_per_row": [list(s) for s in self.row]}


# The CSIT shape: one LM sample per row, a 1024-token session, t = 3, a 384-token response + its t summary tokens.
CSIT_ATTENTION = AttentionShape(2, 16, 4, 128, ((1024, SUMMARY, 384 + SUMMARY),), 1024 + SUMMARY + 384 + SUMMARY)
# Small: same GQA ratio and structure, a padded tail (seq_len rounded up to 16) so padding rows are exercised too.
SMALL_ATTENTION = AttentionShape(2, 8, 2, 64, ((192, SUMMARY, 64 + SUMMARY),), 272)


@dataclass(frozen=True)
class InfoNCEShape:
    queries: int
    group_size: int
    dim: int


CSIT_INFO_NCE = InfoNCEShape(1024, 5, 768)  # a CSIT-scale global batch: 1 positive + 4 hard negatives per query
SMALL_INFO_NCE = InfoNCEShape(128, 4, 256)


@dataclass(frozen=True)
class LMLossShape:
    tokens: int
    hidden: int
    vocab: int
    labelled_fraction: float  # the rest are prompt / embedding tokens with label -100


CSIT_LM_LOSS = LMLossShape(256, 1024, 16000, 0.75)
SMALL_LM_LOSS = LMLossShape(96, 128, 2048, 0.75)


@dataclass(frozen=True)
class PackedBatchShape:
    """Rows of ``seq_len`` tokens, each holding one CSIT LM sample and ``passages`` embedded passages."""

    rows: int
    seq_len: int
    session: int
    response: int
    passage: int
    passages: int

    def segments(self) -> list[list[tuple[int, int, int]]]:
        row = [(self.session, SUMMARY, self.response + SUMMARY)] + [(self.passage, SUMMARY, 0)] * self.passages
        return [row] * self.rows


CSIT_PACKED = PackedBatchShape(4, 4096, 1024, 384, 384, 6)
SMALL_PACKED = PackedBatchShape(2, 1024, 256, 96, 96, 4)


@dataclass(frozen=True)
class CollatorShape:
    """A batch of CSIT training examples with token counts drawn uniformly from the given ranges."""

    examples: int
    session: tuple[int, int]
    passage: tuple[int, int]
    negatives: int
    response: tuple[int, int]
    max_len: int


CSIT_COLLATOR = CollatorShape(16, (200, 1024), (64, 384), 1, (32, 384), 4096)
SMALL_COLLATOR = CollatorShape(4, (32, 128), (16, 64), 1, (8, 64), 512)


def pick(name: str, smoke: bool, csit: Any, small: Any) -> Any:
    """The shape behind a case id; under ``--micro-smoke`` every "csit" case runs at the small shape."""
    if name == "csit" and not smoke:
        return csit
    return small


# ---------------------------------------------------------------------------------------------- FLOPs
def visible_pairs(layout: convret.SessionLayout) -> int:
    """(query, key) pairs the mask lets through: the work a mask-aware kernel has to do."""
    return int(layout.dense_mask().sum())


def attention_flops(layout: convret.SessionLayout, q_heads: int, head_dim: int, backward: bool) -> int:
    """Useful FLOPs: 4 * D per visible pair and query head forward (QK^T and PV), 3.5x that forward + backward
    (the FlashAttention convention: backward = 2.5x forward, including the recomputed QK^T)."""
    forward = 4 * head_dim * q_heads * visible_pairs(layout)
    return int(forward * 3.5) if backward else forward


# ---------------------------------------------------------------------------------------------- timing
def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so that a CUDA timing covers the kernels, not the launch."""
    if device.type != "cuda":
        return fn

    def run() -> Any:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return run


class GemmCeiling:
    """Best-of-N GFLOP/s of a square matmul per (device, dtype), measured once per run, lazily.

    The best run is the closest to the hardware's rate on a shared machine, so the share of it reported in
    ``extra_info["share_of_gemm"]`` is conservative."""

    def __init__(self, size: int = 2048, reps: int = 5):
        self.size = size
        self.reps = reps
        self._cache: dict[tuple[str, torch.dtype], float] = {}

    def gflops(self, device: torch.device, dtype: torch.dtype) -> float:
        key = (str(device), dtype)
        if key not in self._cache:
            a = torch.randn(self.size, self.size, dtype=dtype, device=device)
            b = torch.randn(self.size, self.size, dtype=dtype, device=device)
            step = synchronized(lambda: torch.matmul(a, b), device)
            for _ in range(2):
                step()
            best = float("inf")
            for _ in range(self.reps):
                start = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - start)
            self._cache[key] = 2 * self.size**3 / best / 1e9
        return self._cache[key]


# ---------------------------------------------------------------------------------------------- bookkeeping
class MicroRun:
    """Session-wide record of the medians of this run, for the in-run speed-ups (see the module docstring)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.gemm = GemmCeiling()
        self.medians: dict[str, dict[str, float]] = {}  # group -> entry name -> median seconds
        self.speedups: dict[str, dict[str, dict[str, float]]] = {}  # group -> convret entry -> peer -> ratio
        self.missing_peers: list[str] = []

    def record(
        self,
        benchmark: Any,
        entry: str,
        role: str,
        shape: dict[str, Any],
        dtype: str | None = None,
        flops: int | None = None,
        device: torch.device | None = None,
        gemm_dtype: torch.dtype | None = None,
        **extra: Any,
    ) -> None:
        """Fill ``benchmark.extra_info`` after ``benchmark(fn)`` ran. ``role``: ``"peer"``, ``"convret"``, or
        ``"solo"`` (a convret op with no peer in its group, e.g. the collator).

        A convret entry gets ``extra_info["speedup"] = {peer entry: peer median / own median}`` for every peer of
        its group measured earlier in this run."""
        if role not in ("peer", "convret", "solo"):
            raise ValueError(f"role must be 'peer', 'convret' or 'solo', got {role!r}")
        info = benchmark.extra_info
        info.update(entry=entry, role=role, shape=shape, smoke=self.smoke, **extra)
        if dtype is not None:
            info["dtype"] = dtype
        if device is not None:
            info["device"] = str(device)
        if flops is not None:
            info["useful_flops"] = flops
        if not benchmark.enabled:  # --benchmark-disable: the body ran once, nothing was timed
            return
        median = float(benchmark.stats["median"])
        group = benchmark.group
        if flops is not None:
            info["useful_gflops_per_s"] = flops / median / 1e9
            if gemm_dtype is not None and device is not None:
                ceiling = self.gemm.gflops(device, gemm_dtype)
                info["gemm_gflops_per_s"] = ceiling
                info["share_of_gemm"] = flops / median / 1e9 / ceiling
        peers = {name: t for name, t in self.medians.get(group, {}).items() if name.startswith("peer:")}
        self.medians.setdefault(group, {})[f"{role}:{entry}"] = median
        if role == "convret":
            ratios = {name[len("peer:"):]: t / median for name, t in peers.items()}
            info["speedup"] = ratios
            self.speedups.setdefault(group, {})[entry] = ratios
            if not ratios:
                self.missing_peers.append(f"{group} / {entry}")
