"""What every session-attention backend shares: the op's name and head dims, backend registration, the input
checks and the sliding window's normalisation. Backends import this module, never the package's face."""
from __future__ import annotations

from typing import Callable

import torch

from ... import _dispatch
from ...layout import SessionLayout, check_window

OP = "session_attention"
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
# FlashAttention-2's set: every multiple of 8 up to 256 (Phi-2: 80, Phi-3-mini: 96, Gemma: 256, test models: 8, 16)
SUPPORTED_HEAD_DIMS = tuple(range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))

__all__ = ["OP", "HEAD_DIM_MULTIPLE", "MAX_HEAD_DIM", "SUPPORTED_HEAD_DIMS", "register_backend", "check_inputs",
           "effective_window"]


def register_backend(
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    rank: int = 0,
    gate: _dispatch.Gate | None = None,
    auto_devices: tuple[str, ...] | None = None,
    tolerances: dict | None = None,
    description: str = "",
) -> None:
    """Internal: make ``fn(q, k, v, layout, scale, window=None)`` selectable as ``backend=name`` (see
    ``convret._dispatch``); ``window`` is None or a sliding window that hides something."""
    _dispatch.register(OP, name, fn, rank=rank, gate=gate, auto_devices=auto_devices, tolerances=tolerances,
                       description=description)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SessionLayout,
                 keys_follow_queries: bool = True) -> None:
    """The checks every session-attention entry point shares. ``keys_follow_queries``: q, k and v cover the same
    L positions (the layout's); ``False`` (the cached prefill): the layout covers the keys, q any number of rows."""
    if not isinstance(layout, SessionLayout):
        raise TypeError(f"layout must be a convret.SessionLayout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got shape {tuple(getattr(t, 'shape', ()))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, q_heads, seq_len, head_dim = q.shape
    if keys_follow_queries:
        if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
            raise ValueError(
                f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, length or head dim"
            )
    elif k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or head dim")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"Hq ({q_heads}) must be a multiple of Hkv ({kv_heads})")
    if keys_follow_queries and (layout.batch_size, layout.seq_len) != (batch, seq_len):
        raise ValueError(
            f"layout shape [{layout.batch_size}, {layout.seq_len}] differs from q's [B, L] = [{batch}, {seq_len}]"
        )
    if not keys_follow_queries and (layout.batch_size, layout.seq_len) != (batch, k.shape[2]):
        raise ValueError(f"layout shape [{layout.batch_size}, {layout.seq_len}] differs from the keys' [B, Lk] = "
                         f"[{batch}, {k.shape[2]}]")
    if head_dim % HEAD_DIM_MULTIPLE != 0 or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"unsupported head dim {head_dim}: session_attention takes multiples of {HEAD_DIM_MULTIPLE} up to "
            f"{MAX_HEAD_DIM} (FlashAttention-2's set)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on mixed devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v have mixed dtypes: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")


def effective_window(window: int | None, layout: SessionLayout) -> int | None:
    """``window`` checked, or None where it hides nothing from the layout (no sample is longer than the window):
    the kernels then run their window-free code. Under torch.compile the window is kept as given (finding the
    layout's longest span reads a tensor)."""
    window = check_window(window)
    if window is None or torch.compiler.is_compiling():
        return window
    return window if window <= layout.max_attention_span() else None
