"""``session_attention``: the public face of the session-masked attention backends."""
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


def session_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SessionLayout,
    scale: float | None = None,
    backend: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Attention under a :class:`SessionLayout` mask, differentiable in q, k and v.

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, L, D]`` with ``Hq % Hkv == 0`` (GQA: query head h reads kv head
            ``h // (Hq // Hkv)``). Any strides. D is any multiple of 8 up to 256, on every backend.
        layout: the batch's layout, shape ``[B, L]``.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpu"`` (native CPU backend),
            ``"reference"`` (dense O(L^2) oracle, any device) or ``"auto"`` (``$CONVRET_BACKEND_SESSION_ATTENTION``
            if set, else triton on CUDA, cpu on CPU, reference elsewhere). A named backend that cannot run on
            the tensors' device raises ``ValueError`` with the reason.
        window: a sliding window of that many keys (Mistral's and Qwen2's ``sliding_window``): query q then sees
            key j only if ``q - j < window`` besides the layout's mask. Every backend takes it and skips the key
            tiles it hides. None (the default), or a window longer than every sample, costs nothing.

    Returns:
        ``[B, Hq, L, D]`` in q's dtype. Query rows with no visible key (padding) are zeros, with zero gradient.
    """
    _check_inputs(q, k, v, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    window = effective_window(window, layout)
    impl = _dispatch.resolve(OP, backend, q.device)
    return impl.fn(q, k, v, layout.to(q.device), float(scale), window=window)


def effective_window(window: int | None, layout: SessionLayout) -> int | None:
    """``window`` checked, or None where it hides nothing from the layout (no sample is longer than the window):
    the kernels then run their window-free code. Under torch.compile the window is kept as given (finding the
    layout's longest span reads a tensor)."""
    window = check_window(window)
    if window is None or torch.compiler.is_compiling():
        return window
    return window if window <= layout.max_attention_span() else None


def available_backends(op: str = OP, device: torch.device | str | None = None) -> list[str]:
    """Backends registered for ``op`` (default: session attention); with ``device``, only those that can run
    there. ``convret.backend_info()["ops"]`` says why the others cannot."""
    names = _dispatch.backends(op)
    if device is None:
        return names
    return [name for name in names if _dispatch.get(op, name).unavailable_reason(torch.device(device)) is None]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend name ``session_attention(..., backend=backend)`` runs on ``device`` (raises as it would)."""
    return _dispatch.resolve(OP, backend, device).backend


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SessionLayout,
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


# ---------------------------------------------------------------------- reference backend
def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SessionLayout, scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Dense-mask attention computed in at least fp32 (float64 inputs stay float64): the oracle.

    O(B * H * L^2) memory. Differentiable through plain autograd. ``window``: see :func:`session_attention`."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    allowed = layout.dense_mask(window).unsqueeze(1)  # [B, 1, L, L]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    # finite fill, then zero the masked probabilities: a row with no visible key gives zeros, not NaN,
    # and its gradient is zero too.
    scores = scores.masked_fill(~allowed, torch.finfo(compute_dtype).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.matmul(probs, vc).to(q.dtype)


register_backend("reference", reference_attention, rank=0,
                 description="dense-mask oracle, O(L^2) memory, at least fp32")

from . import cpu, triton  # noqa: E402,F401  (register backend="cpu" and backend="triton")
from . import cached  # noqa: E402,F401  (registers the cached prefill's op, so that backend_info() lists it)
