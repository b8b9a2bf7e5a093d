"""``session_attention``: the public face of the session-masked attention backends.

The backends register themselves when imported (``reference.py``: the dense oracle; ``cpu.py``: the native CPU
kernels and their PyTorch fallback; ``triton.py``; ``cached.py``: the cached prefill of the incremental encoder),
each from :mod:`.common`, which they share; this module imports them all and resolves a call to one.
"""
from __future__ import annotations

import torch

from ... import _dispatch
from ...layout import SessionLayout
from . import reference  # noqa: F401  (each of these registers its backends, in this order)
from . import cpu  # noqa: F401, I001
from . import triton  # noqa: F401, I001
from . import cached  # noqa: F401, I001
from .common import (HEAD_DIM_MULTIPLE, MAX_HEAD_DIM, OP, SUPPORTED_HEAD_DIMS, check_inputs, effective_window,
                     register_backend)
from .reference import reference_attention

__all__ = ["session_attention", "reference_attention", "available_backends", "resolve_backend", "register_backend",
           "effective_window", "check_inputs", "OP", "SUPPORTED_HEAD_DIMS", "HEAD_DIM_MULTIPLE", "MAX_HEAD_DIM"]


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
    check_inputs(q, k, v, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    window = effective_window(window, layout)
    impl = _dispatch.resolve(OP, backend, q.device)
    return impl.fn(q, k, v, layout.to(q.device), float(scale), window=window)


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
