"""``backend="cpu"``: session attention on CPU tensors, forward and backward.

Two implementations behind one entry point, :func:`session_attention_cpu`:

- **native**: the C++ kernels of ``csrc/`` (built by ``setup.py`` through the top-level ``CMakeLists.txt``
  against the installed torch), registered as ``torch.ops.convret_cpu.*``. Tile-classified, GQA groups
  stacked into one GEMM operand, tile GEMMs with fp32 accumulation (MKL; for bf16 / fp16 on CPUs with 16-bit
  units, oneDNN's brgemm ukernel on K / V packed once per kv head), threads = ``torch.get_num_threads()``.
- **fallback**: pure PyTorch, used when the extension is not built or cannot load. Each sample becomes causal
  SDPA calls (its session segment; its response rows against ``[summary | response]`` keys) with
  ``enable_gqa=True``; padding rows are zeros. A sliding window longer than a segment changes nothing there;
  a shorter one becomes that segment's banded bool mask.

``CONVRET_CPU_BACKEND=fallback`` (environment, read at every call) or ``implementation="fallback"`` forces
the fallback; ``convret.backend_info()`` says which path is active and why.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..._dispatch import cpu_only
from ...layout import SessionLayout, check_window
from .common import register_backend

ENV_IMPLEMENTATION = "CONVRET_CPU_BACKEND"
ENV_BACKWARD = "CONVRET_CPU_BACKWARD"
# the fused backward (5 GEMMs per pair, B * Hkv work items) is used while it still has this many items per
# thread; below that the split backward (7 GEMMs per pair, more items than the forward) keeps every core busy
FUSED_BACKWARD_ITEMS_PER_THREAD = 4
_LIBRARY_GLOB = "_convret_cpu*.so"
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TileSizes:
    """Query rows (per head) and keys per tile of the native kernels; the G query heads of a GQA group are
    stacked, so a forward GEMM has ``G * fwd_block_m`` rows."""

    fwd_block_m: int
    fwd_block_n: int
    bwd_block_m: int
    bwd_block_n: int


def default_tile_sizes(group: int) -> TileSizes:
    """Tiles of about 128 stacked query rows (``G * block_m``, 16 to 64 rows per head) by 128 keys forward and
    64 keys backward: the best of the sizes measured on the 2-core AVX-512 development machine at the
    benchmark's shapes (D = 128). Larger tiles waste more of the partial tiles; smaller ones starve the
    GEMMs."""
    rows_per_head = max(16, min(64, 128 // group))
    return TileSizes(fwd_block_m=rows_per_head, fwd_block_n=128, bwd_block_m=rows_per_head, bwd_block_n=64)


def default_cached_tile_sizes(group: int) -> TileSizes:
    """Tiles of the cached prefill's forward (only ``fwd_*`` are read): up to 64 query rows per head and 256
    stacked rows (``G * block_m``) by 256 keys. Its query tiles are cut at sample boundaries, so they are
    often shorter than ``block_m`` (85 new tokens: two tiles of 43 rows); taller and wider tiles than the
    session forward's were 3-8% faster at serving shapes (32 conversations of 700 cached + 85 new tokens,
    1 thread, fp32 and bf16, Hq/Hkv/D = 4/2/32, 16/4/128, 28/4/128: convret bench cached-prefill)."""
    rows_per_head = max(16, min(64, 256 // group))
    return TileSizes(fwd_block_m=rows_per_head, fwd_block_n=256, bwd_block_m=rows_per_head, bwd_block_n=64)


# ------------------------------------------------------------------------------------ loading the library
class _NativeState:
    """Finds and loads the built library (once); ``directory`` defaults to this package's."""

    def __init__(self, directory: str | None = None) -> None:
        # the extension is built beside the package's top level (convret/_convret_cpu*.so)
        self.directory = directory or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.loaded = False
        self.path: str | None = None
        self.reason = "not loaded yet"
        self.blas: str | None = None
        self._tried = False

    def load(self) -> bool:
        if self._tried:
            return self.loaded
        self._tried = True
        here = self.directory
        candidates = sorted(glob.glob(os.path.join(here, _LIBRARY_GLOB)))
        if not candidates:
            self.reason = (
                f"native extension not built: no {_LIBRARY_GLOB} in {here} (the build was skipped or failed at "
                "install; rerun `pip install --no-build-isolation -e .` and read its warnings)"
            )
            return False
        self.path = candidates[0]
        try:
            torch.ops.load_library(self.path)
            self.blas = torch.ops.convret_cpu.blas_info()
        except Exception as error:  # a stale build against another torch, a missing symbol, ...
            self.reason = f"native extension at {self.path} failed to load: {error}"
            return False
        _register_fake_kernels()
        self.loaded = True
        self.reason = f"native extension loaded from {self.path}"
        return True


_fakes_registered = False


def _register_fake_kernels() -> None:
    """Shape-only versions of the native ops, so that torch.compile can trace through them."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("convret_cpu::session_attention_forward")
    def _forward_fake(q, k, v, mask_start, tile_min, tile_max, scale, block_m, block_n, window=0):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)  # outputs keep q's layout

    @torch.library.register_fake("convret_cpu::cached_session_attention_forward")
    def _cached_forward_fake(q, k, v, mask_start, query_positions, tile_min, tile_max, scale, block_m, block_n,
                             window=0):
        return torch.empty_like(q)

    @torch.library.register_fake("convret_cpu::session_attention_backward")
    def _backward_fake(q, k, v, out, grad_out, lse, mask_start, tile_min, tile_max, scale, block_m, block_n, split,
                       window=0):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_native = _NativeState()


def native_available() -> bool:
    """True when the C++ extension is built and loads."""
    return _native.load()


def _requested_implementation(implementation: str) -> str:
    if implementation == "auto":
        implementation = os.environ.get(ENV_IMPLEMENTATION, "auto").strip().lower() or "auto"
    if implementation not in ("auto", "native", "fallback"):
        raise ValueError(
            f"implementation must be 'auto', 'native' or 'fallback', got {implementation!r} "
            f"(from the argument or ${ENV_IMPLEMENTATION})"
        )
    return implementation


def backend_info() -> dict[str, Any]:
    """Which CPU session-attention path ``backend="cpu"`` runs now, and why.

    Returns a dict with ``implementation`` (``"native"`` or ``"fallback"``), ``reason``, ``library`` (path of
    the loaded extension or None), ``blas`` (the GEMM routines the native kernels can call), ``tile_gemm``
    (per 16-bit dtype: the tile GEMM a probe picked and the rates it measured; the probe runs on first use),
    ``threads`` (``torch.get_num_threads()``), ``tile_sizes`` and ``work_items`` (how the forward and the
    backward split their work over threads).
    """
    requested = _requested_implementation("auto")
    loaded = native_available()
    if requested == "fallback":
        implementation, reason = "fallback", f"forced by ${ENV_IMPLEMENTATION}=fallback ({_native.reason})"
    elif loaded:
        implementation, reason = "native", _native.reason
    else:
        implementation, reason = "fallback", _native.reason
    return {
        "implementation": implementation,
        "reason": reason,
        "library": _native.path if loaded else None,
        "blas": _native.blas,
        "tile_gemm": tile_gemm_info() if loaded else None,
        "threads": torch.get_num_threads(),
        "tile_sizes": "default_tile_sizes(G): " + repr(default_tile_sizes(4)) + " for G = 4",
        "work_items": (
            "forward: B * Hkv * ceil(L / fwd_block_m); backward: fused B * Hkv (5 GEMMs per pair), or split "
            "B * Hkv * (ceil(L / bwd_block_n) + ceil(L / bwd_block_m)) (7 GEMMs per pair), fused while "
            f"B * Hkv >= {FUSED_BACKWARD_ITEMS_PER_THREAD} * threads (${ENV_BACKWARD}=fused|split forces one); "
            "at B 2, Hkv 4, L 1411, G 4: " + repr(work_items(2, 4, 1411, default_tile_sizes(4)))
        ),
    }


def tile_gemm_info() -> dict[str, str]:
    """``{"bf16": report, "fp16": report}``: which tile GEMM the native kernels use for each 16-bit dtype (MKL,
    oneDNN's brgemm, an fp32 upcast + sgemm, or the packed path: oneDNN's brgemm ukernel on K / V packed once
    into VNNI pairs, where the CPU has bf16 / fp16 units), picked by a short probe at first use, and the rates
    measured."""
    if not native_available():
        raise RuntimeError(f"the native CPU backend is not available: {_native.reason}")
    lines = torch.ops.convret_cpu.tile_gemm_info().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def set_tile_gemm(dtype: torch.dtype, implementation: str) -> str:
    """Force the 16-bit tile GEMM of the native kernels: ``"mkl"``, ``"onednn"``, ``"upcast"``, ``"packed"``
    (raises where it cannot run), or ``"auto"`` (probe again). Also ``$CONVRET_CPU_TILE_GEMM`` pins one at the
    first probe. Returns the new report."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"tile GEMM selection is per 16-bit dtype (bf16, fp16), got {dtype}")
    if not native_available():
        raise RuntimeError(f"the native CPU backend is not available: {_native.reason}")
    return torch.ops.convret_cpu.set_tile_gemm(names[dtype], implementation)


# ------------------------------------------------------------------------------------------- native path
def backward_schedule(batch: int, num_kv_heads: int, threads: int | None = None) -> str:
    """``"fused"`` or ``"split"``: how the native backward splits its work (``$CONVRET_CPU_BACKWARD`` forces
    one). Fused: B * Hkv work items, each owning dK / dV of a kv head and dQ of its query heads (5 GEMMs per
    (query tile, key tile) pair). Split: B * Hkv * ceil(L / bwd_block_n) dK / dV items, then
    B * Hkv * ceil(L / bwd_block_m) dQ items (7 GEMMs per pair), at least the forward's B * Hkv * ceil(L /
    fwd_block_m) items when the block sizes agree. Auto: fused while B * Hkv >= 4 * threads."""
    forced = os.environ.get(ENV_BACKWARD, "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "split"):
        raise ValueError(f"${ENV_BACKWARD} must be 'auto', 'fused' or 'split', got {forced!r}")
    if forced != "auto":
        return forced
    threads = threads or torch.get_num_threads()
    return "fused" if batch * num_kv_heads >= FUSED_BACKWARD_ITEMS_PER_THREAD * threads else "split"


def work_items(batch: int, num_kv_heads: int, seq_len: int, tiles: TileSizes, threads: int | None = None) -> dict:
    """The work-item counts of the native forward and backward at this shape (what ``backend_info`` shows)."""
    def tiles_of(block: int) -> int:
        return -(-seq_len // block)

    schedule = backward_schedule(batch, num_kv_heads, threads)
    groups = batch * num_kv_heads
    backward = groups if schedule == "fused" else groups * (tiles_of(tiles.bwd_block_n) + tiles_of(tiles.bwd_block_m))
    return {"forward": groups * tiles_of(tiles.fwd_block_m), "backward": backward, "backward_schedule": schedule}


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of D contiguous elements; any other stride pattern is kept as is."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _native_window(window: int | None) -> int:
    """The native ops' window argument: 0 means none."""
    return 0 if window is None else int(window)


class _NativeSessionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: SessionLayout, scale: float, tiles: TileSizes, window: int | None):
        q, k, v = (_unit_stride_d(t) for t in (q, k, v))
        mask_start = layout.mask_start.to(torch.int32).contiguous()
        bounds = layout.tile_bounds(tiles.fwd_block_n)
        out, lse = torch.ops.convret_cpu.session_attention_forward(
            q, k, v, mask_start, bounds.min_mask_start, bounds.max_mask_start, scale,
            tiles.fwd_block_m, tiles.fwd_block_n, _native_window(window),
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.tiles, ctx.window = layout, scale, tiles, window
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, tiles = ctx.layout, ctx.tiles
        bounds = layout.tile_bounds(tiles.bwd_block_n)
        grad_q, grad_k, grad_v = torch.ops.convret_cpu.session_attention_backward(
            q, k, v, out, _unit_stride_d(grad_out), lse, layout.mask_start.to(torch.int32).contiguous(),
            bounds.min_mask_start, bounds.max_mask_start, ctx.scale, tiles.bwd_block_m, tiles.bwd_block_n,
            backward_schedule(q.shape[0], k.shape[1]) == "split", _native_window(ctx.window),
        )
        return grad_q, grad_k, grad_v, None, None, None, None


# ----------------------------------------------------------------------------------------- fallback path
def fallback_session_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SessionLayout, scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Pure-PyTorch session attention: per sample, causal SDPA over its session segment (prefix + summary),
    then causal SDPA of ``[summary | response]`` queries against the same keys, keeping the response rows.
    Padding rows are zeros. Differentiable through SDPA's own backward. ``window``: a sliding window of that
    many keys (the segments are contiguous, so it is the same band in their own coordinates), or None."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    rows = []
    for b, samples in enumerate(layout.segments):
        pieces = []
        pos = 0
        for prefix_len, summary_len, response_len in samples:
            session_end = pos + prefix_len + summary_len
            pieces.append(_causal_sdpa(q, k, v, b, pos, session_end, scale, window))
            if response_len > 0:
                summary_start, end = pos + prefix_len, session_end + response_len
                pieces.append(_causal_sdpa(q, k, v, b, summary_start, end, scale, window)[:, :, summary_len:])
            pos = session_end + response_len
        if pos < seq_len:
            pieces.append(q.new_zeros(1, num_q_heads, seq_len - pos, head_dim))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _causal_sdpa(q, k, v, b: int, start: int, end: int, scale: float, window: int | None = None) -> torch.Tensor:
    span = slice(start, end)
    qs, ks, vs = q[b : b + 1, :, span], k[b : b + 1, :, span], v[b : b + 1, :, span]
    if window is None or end - start <= window:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    positions = torch.arange(end - start, device=q.device)
    offset = positions.view(-1, 1) - positions.view(1, -1)  # query - key
    band = (offset >= 0) & (offset < window)
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale, enable_gqa=True)


# ------------------------------------------------------------------------------------------- entry point
def session_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SessionLayout,
    scale: float | None = None,
    *,
    implementation: str = "auto",
    tile_sizes: TileSizes | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Session attention on CPU tensors (same contract as :func:`convret.session_attention`).

    Args:
        implementation: ``"native"`` (the C++ kernels; raises if they are not built), ``"fallback"`` (pure
            PyTorch) or ``"auto"`` (native when it loads, unless ``$CONVRET_CPU_BACKEND=fallback``). float64
            inputs always take the fallback.
        tile_sizes: native tile sizes (tests force small ones so that every tile class occurs).
        window: a sliding window of that many keys, or None.
    """
    window = check_window(window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    requested = _requested_implementation(implementation)
    if requested == "native" and not native_available():
        raise RuntimeError(f"the native CPU backend is not available: {_native.reason}")
    if requested == "native" and q.dtype not in _NATIVE_DTYPES:
        raise ValueError(f"the native CPU kernels take {_NATIVE_DTYPES}, got {q.dtype}")
    use_native = requested != "fallback" and q.dtype in _NATIVE_DTYPES and native_available()
    if not use_native:
        return fallback_session_attention(q, k, v, layout, float(scale), window)
    tiles = tile_sizes or default_tile_sizes(q.shape[1] // k.shape[1])
    return _NativeSessionAttention.apply(q, k, v, layout, float(scale), tiles, window)


def cached_native_unavailable_reason(device: torch.device) -> str | None:
    """Gate of the cached prefill's ``backend="cpu"`` (``convret.ops.session_attention.cached``): CPU tensors,
    the native library loaded, and not forced off by ``$CONVRET_CPU_BACKEND=fallback`` (the cached prefill's
    PyTorch path is its own ``backend="sdpa"``, which ``"auto"`` then picks)."""
    reason = cpu_only(device)
    if reason is not None:
        return reason
    if _requested_implementation("auto") == "fallback":
        return f"forced off by ${ENV_IMPLEMENTATION}=fallback"
    if not native_available():
        return _native.reason
    return None


def cached_session_attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SessionLayout,
    query_positions: torch.Tensor,
    scale: float,
    tile_sizes: TileSizes | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The cached prefill (contract of :func:`convret.ops.session_attention.cached.cached_session_attention`) on
    the native forward kernel: fp32 / bf16 / fp16 CPU tensors, inputs already checked. Forward only.

    Query tiles hold at most ``tile_sizes.fwd_block_m`` (default: :func:`default_cached_tile_sizes`) rows of one
    packed sample (cut at sample boundaries); each visits only the key tiles its positions can see. Padding
    query rows are zeros. Raises ``RuntimeError`` when a gradient is asked for.
    """
    if not native_available():
        raise RuntimeError(f"the native CPU backend is not available: {_native.reason}")
    if q.dtype not in _NATIVE_DTYPES:
        raise ValueError(f"the native CPU kernels take {_NATIVE_DTYPES}, got {q.dtype}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("cached_session_attention on the native CPU kernel is forward only (serving does not "
                           "differentiate): run it under torch.no_grad() / torch.inference_mode(), or use "
                           "backend='sdpa' or 'reference' for gradients")
    tiles = tile_sizes or default_cached_tile_sizes(q.shape[1] // k.shape[1])
    q, k, v = (_unit_stride_d(t) for t in (q, k, v))
    bounds = layout.tile_bounds(tiles.fwd_block_n)
    return torch.ops.convret_cpu.cached_session_attention_forward(
        q, k, v, layout.mask_start.to(torch.int32).contiguous(), query_positions.to(torch.long).contiguous(),
        bounds.min_mask_start, bounds.max_mask_start, float(scale), tiles.fwd_block_m, tiles.fwd_block_n,
        _native_window(check_window(window)),
    )


def _cpu_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SessionLayout, scale: float,
                 window: int | None = None) -> torch.Tensor:
    return session_attention_cpu(q, k, v, layout, scale, window=window)


# Bounds of tests/test_attention_cpu.py against the float64 oracle: max |error| <= tol * max(1, max |oracle|).
register_backend(
    "cpu", _cpu_backend, rank=20, gate=cpu_only,
    tolerances={torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2},
    description="native C++ kernels (PyTorch fallback when not built; see backend_info())",
)
