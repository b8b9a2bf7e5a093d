"""The dense-mask oracle of session attention, registered as ``backend="reference"``."""
from __future__ import annotations

import torch

from ...layout import SessionLayout
from .common import register_backend

__all__ = ["reference_attention"]


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
