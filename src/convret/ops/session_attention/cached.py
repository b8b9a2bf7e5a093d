"""Cached prefill: session attention whose query rows are some of the key positions (a KV cache).

When a conversation grows by a turn, the keys and values of its earlier tokens are unchanged (session rows are
ordinary causal rows), so only the new tokens need to run: their queries attend to ``cache + new`` keys. With
several conversations packed into one row (the packing of ``convret encode``), the new tokens of a row are not
one contiguous tail of it, so every query row carries the key position it stands at:

- ``k``, ``v``: ``[B, Hkv, Lk, D]``, the whole packed row (cached keys and the new tokens' keys in place);
- ``layout``: the :class:`convret.SessionLayout` of those ``Lk`` key positions (the same as a full encode's);
- ``q``: ``[B, Hq, Lq, D]``, only the rows being computed, and ``query_positions`` (int ``[B, Lq]``): the key
  position of each. Query i of row b may attend to key j iff ``j <= p`` and ``p < mask_start[b, j]`` with
  ``p = query_positions[b, i]``: exactly the mask its row has in the full ``[Lk, Lk]`` attention. A position
  ``>= Lk`` (padding of the query rows) sees nothing and gives zeros.

With ``query_positions = arange(Lk)`` this is :func:`convret.session_attention`; with ``Lq < Lk`` and one
sample per row at positions ``Lk - Lq .. Lk - 1`` it is bottom-right aligned causal attention over a cache. A
sliding ``window`` also hides key j from position p when ``p - j >= window``, in every backend.

Backends: ``reference`` (dense float64 oracle), ``sdpa`` (PyTorch SDPA per packed sample, any device),
``cpu`` (the native C++ forward kernel of ``csrc/``, ``torch.ops.convret_cpu.cached_session_attention_forward``:
the session forward's tiles, GQA stacking and fp32 online softmax, with query tiles cut at sample boundaries
that visit only the key tiles their positions can see; fp32 / bf16 / fp16) and ``triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``). ``"auto"`` picks triton on CUDA and, on CPU, ``cpu`` when the native library is loaded
(measured 1.2-1.5x faster than the SDPA loop in fp32 and 1.8-3.7x in bf16 at serving shapes, one thread:
``convret bench cached-prefill``), else ``sdpa``; ``$CONVRET_BACKEND_CACHED_SESSION_ATTENTION=sdpa`` or
``$CONVRET_CPU_BACKEND=fallback`` force the SDPA loop. ``convret.backend_info()["cached_prefill"]`` says which.

:class:`CachedPrefill` is the model keyword that carries the cache into every layer (see :mod:`convret.hf`).
Forward only: serving does not differentiate (the ``cpu`` backend raises when a gradient is asked for).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ... import _dispatch
from ...layout import SessionLayout, check_window
from .common import check_inputs as check_qkv
from .common import effective_window
from .cpu import _NATIVE_DTYPES, cached_native_unavailable_reason, cached_session_attention_native

OP = "cached_session_attention"

__all__ = ["cached_session_attention", "CachedPrefill", "reference_cached_attention", "sdpa_cached_attention",
           "cached_prefill_info"]


def cached_session_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SessionLayout,
    query_positions: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the query rows at ``query_positions`` under ``layout`` (module docstring). No gradient.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, ``Hq % Hkv == 0``; D a multiple of 8 up to 256.
        layout: ``[B, Lk]``.
        query_positions: integer ``[B, Lq]``, the key position of every query row (``>= Lk``: a padding row).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"cpu"`` (native C++ kernel, CPU tensors; float64 runs the sdpa path), ``"sdpa"`` (PyTorch
            SDPA per packed sample, any device), ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"reference"`` (dense oracle) or ``"auto"`` (``$CONVRET_BACKEND_CACHED_SESSION_ATTENTION`` if set,
            else triton on CUDA, cpu on CPU when the native library is loaded, sdpa elsewhere).
        window: a sliding window of that many keys (position p sees key j only if ``p - j < window``), or None;
            one longer than every sample of the layout costs nothing.

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype; padding query rows are zeros.
    """
    _check_inputs(q, k, v, layout, query_positions)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    window = effective_window(window, layout)
    impl = _dispatch.resolve(OP, backend, q.device)
    return impl.fn(q, k, v, layout.to(q.device), query_positions.to(q.device, torch.long), float(scale),
                   window=window)


def _check_inputs(q, k, v, layout, query_positions) -> None:
    check_qkv(q, k, v, layout, keys_follow_queries=False)
    batch, q_len = q.shape[0], q.shape[2]
    if (not isinstance(query_positions, torch.Tensor) or query_positions.dtype.is_floating_point
            or tuple(query_positions.shape) != (batch, q_len)):
        raise ValueError(f"query_positions must be an integer [B, Lq] = [{batch}, {q_len}] tensor, got "
                         f"{tuple(getattr(query_positions, 'shape', ()))}")


def dense_cached_mask(layout: SessionLayout, query_positions: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
    """bool ``[B, Lq, Lk]``: True where query row i (at ``query_positions[b, i]``) may attend to key j (with
    ``window``: only keys ``j > p - window`` besides)."""
    window = check_window(window)
    keys = torch.arange(layout.seq_len, device=layout.device).view(1, 1, -1)
    pos = query_positions.to(layout.device).unsqueeze(-1)
    mask = (keys <= pos) & (pos < layout.mask_start.unsqueeze(1))
    if window is not None:
        mask = mask & (keys > pos - window)
    return mask


def reference_cached_attention(q, k, v, layout, query_positions, scale, window=None) -> torch.Tensor:
    """Dense-mask oracle in at least fp32 (float64 stays float64); O(B * H * Lq * Lk) memory."""
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    allowed = dense_cached_mask(layout, query_positions, window).unsqueeze(1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.matmul(probs, vc).to(q.dtype)


def sdpa_cached_attention(q, k, v, layout, query_positions, scale, window=None) -> torch.Tensor:
    """PyTorch SDPA per packed sample: the query rows standing in a sample attend to that sample's keys only.
    A sample whose queries are all of its positions runs ``is_causal=True`` (a full encode, when no window is
    shorter than it); otherwise the sample's own rows of the mask (``[queries, sample length]``, bottom-right
    causal for a cached prefill, banded by the window)."""
    out = q.new_zeros(q.shape)
    positions = query_positions.cpu()
    mask_start = layout.mask_start
    for b, samples in enumerate(layout.segments):
        start = 0
        row_pos = positions[b]
        for sample in samples:
            end = start + sum(sample)
            rows = ((row_pos >= start) & (row_pos < end)).nonzero().flatten()
            if len(rows):
                first, count = int(rows[0]), len(rows)
                contiguous = int(rows[-1]) - first + 1 == count
                idx = slice(first, first + count) if contiguous else rows.to(q.device)
                qs = q[b : b + 1, :, idx]
                ks, vs = k[b : b + 1, :, start:end], v[b : b + 1, :, start:end]
                pos = row_pos[rows]
                full_encode = count == end - start and bool((pos == torch.arange(start, end)).all())
                if full_encode and sample[2] == 0 and (window is None or end - start <= window):
                    res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
                else:
                    keys = torch.arange(start, end, device=q.device).view(1, -1)
                    p = pos.to(q.device).view(-1, 1)
                    allowed = (keys <= p) & (p < mask_start[b, start:end].view(1, -1))
                    if window is not None:
                        allowed = allowed & (keys > p - window)
                    res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed.view(1, 1, *allowed.shape),
                                                         scale=scale, enable_gqa=True)
                out[b : b + 1, :, idx] = res
            start = end
    return out


def _cpu_cached_attention(q, k, v, layout, query_positions, scale, window=None) -> torch.Tensor:
    if q.dtype not in _NATIVE_DTYPES:  # float64: the native kernels take fp32 / bf16 / fp16 only
        return sdpa_cached_attention(q, k, v, layout, query_positions, scale, window)
    return cached_session_attention_native(q, k, v, layout, query_positions, scale, window=window)


def _triton_cached_attention(q, k, v, layout, query_positions, scale, window=None) -> torch.Tensor:
    from ...kernels.session_attention import cached_session_attention_triton

    return cached_session_attention_triton(q, k, v, layout, query_positions, scale, window=window)


_dispatch.register(OP, "reference", reference_cached_attention, rank=0,
                   tolerances={torch.float32: 1e-5, torch.float64: 1e-12},
                   description="dense-mask oracle, O(Lq * Lk) memory, at least fp32")
_dispatch.register(OP, "sdpa", sdpa_cached_attention, rank=10,
                   tolerances={torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2},
                   description="PyTorch SDPA per packed sample (CPU: its flash kernel), any device")
_dispatch.register(OP, "cpu", _cpu_cached_attention, rank=20, gate=cached_native_unavailable_reason,
                   auto_devices=("cpu",),
                   tolerances={torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2,
                               torch.float64: 1e-10},
                   description="native C++ forward kernel with per-row query positions (fp32 / bf16 / fp16; "
                               "float64 runs the sdpa path); needs the built extension, see backend_info()")
_dispatch.register(OP, "triton", _triton_cached_attention, rank=30, gate=_dispatch.triton_gate,
                   auto_devices=("cuda",), tolerances={("cuda", torch.float32): 1e-2, torch.float32: 2e-4,
                                                       torch.float16: 1e-2},
                   description="Triton forward kernel with per-row query positions (CUDA; CPU under "
                               "TRITON_INTERPRET=1)")


class CachedPrefill:
    """The model keyword (``model(..., cached_prefill=prefill)``) of a cached prefill.

    The model runs on the new tokens only (``input_ids`` / ``position_ids`` ``[B, Lq]``); in every layer the
    attention function calls :meth:`keys_values` with the new tokens' keys and values (after RoPE), which places
    them at their ``query_positions`` in a ``[B, Hkv, Lk, D]`` buffer that already holds the cached keys, and
    remembers them in :attr:`new_kv` so that the caller can extend its cache afterwards.

    Args:
        layout: the ``[B, Lk]`` layout of the full rows (cached + new tokens).
        query_positions: int ``[B, Lq]``: key position of each new token (``Lk`` for padding).
        cached: per row, ``(key_start, kv)`` pieces: ``kv`` is ``[num_layers, 2, Hkv, n, D]`` (keys, values) of
            key positions ``key_start .. key_start + n - 1``.
    """

    def __init__(self, layout: SessionLayout, query_positions: torch.Tensor,
                 cached: Sequence[Sequence[tuple[int, torch.Tensor]]]):
        if len(cached) != layout.batch_size:
            raise ValueError(f"cached has {len(cached)} rows, the layout {layout.batch_size}")
        self.layout = layout
        self.query_positions = query_positions.to(torch.long)
        self.cached = cached
        self.new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scatter_index: torch.Tensor | None = None

    @property
    def key_length(self) -> int:
        return self.layout.seq_len

    def position_ids(self) -> torch.Tensor:
        """``[B, Lq]`` position ids of the new tokens: their positions within their own packed sample."""
        full = self.layout.position_ids()
        full = torch.cat([full, full[:, -1:]], dim=1)  # padding queries (position Lk) read the last one
        return full.gather(1, self.query_positions.clamp(max=self.key_length).to(full.device))

    def keys_values(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Hkv, Lk, D]`` keys and values of layer ``layer_idx``: the cached pieces and the new tokens'."""
        batch, heads, q_len, head_dim = key.shape
        self.new_kv[layer_idx] = (key, value)
        length = self.key_length
        if self._scatter_index is None or self._scatter_index.device != key.device:
            index = self.query_positions.clamp(max=length).to(key.device)
            self._scatter_index = index
        index = self._scatter_index.view(batch, 1, q_len, 1).expand(batch, heads, q_len, head_dim)
        out = []
        for new in (key, value):
            full = new.new_zeros(batch, heads, length + 1, head_dim)  # slot Lk takes the padding queries
            for b, pieces in enumerate(self.cached):
                for start, kv in pieces:
                    part = kv[layer_idx, 0 if new is key else 1]
                    full[b, :, start : start + part.shape[1]] = part.to(device=new.device, dtype=new.dtype)
            full.scatter_(2, index, new)
            out.append(full[:, :, :length])
        return out[0], out[1]


def register_backend(name: str, fn: Callable[..., torch.Tensor], **kwargs) -> None:
    """Internal: make ``fn(q, k, v, layout, query_positions, scale, window=None)`` selectable as
    ``backend=name``."""
    _dispatch.register(OP, name, fn, **kwargs)


def cached_prefill_info() -> str:
    """Which path serves the cached prefill of the incremental session encoder on CPU (``backend="auto"``
    there), and why (``convret.backend_info()["cached_prefill"]``)."""
    try:
        backend = _dispatch.resolve(OP, "auto", "cpu").backend
    except ValueError as error:
        return f"none: {error}"
    if backend == "cpu":
        return ("native: torch.ops.convret_cpu.cached_session_attention_forward (cached_session_attention "
                "backend='cpu'; float64 runs the sdpa path)")
    why = cached_native_unavailable_reason(torch.device("cpu"))
    if why is None:
        variable = _dispatch.env_variable(OP)
        why = f"available, not picked: ${variable}={os.environ.get(variable, '')!r}"
    return f"{backend} (cached_session_attention backend={backend!r}; native kernel: {why})"
