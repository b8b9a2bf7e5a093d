"""The dense-mask peers every benchmark names: eager attention with a dense additive mask (what the released
CSIT code runs) and SDPA with the same mask as a bool tensor. Not part of the fast path.

Both build the O(L^2) mask from the layout, as the reference CSIT implementation does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import SessionLayout


def additive_mask(layout: SessionLayout, dtype: torch.dtype) -> torch.Tensor:
    """Float ``[B, 1, L, L]``: 0 where attending, ``finfo(dtype).min`` where masked (Hugging Face's eager
    convention; a bool mask fed to eager would be added as 0 / 1, silently wrong)."""
    allowed = layout.dense_mask().unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def dense_mask_eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Hugging Face's eager path: matmul, additive float mask, softmax in fp32, matmul; K/V expanded for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_dense_mask_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bool_mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``scaled_dot_product_attention`` with a dense bool ``[B, 1, L, L]`` mask (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=scale, enable_gqa=True)
