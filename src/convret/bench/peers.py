"""The session-attention peers every attention benchmark compares, behind one interface.

A peer is ``fn(q, k, v) -> out`` for ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` under one
:class:`convret.SessionLayout`:

- ``dense-mask eager``: Hugging Face's eager path with the additive ``[B, 1, L, L]`` mask (the reference
  CSIT implementation's attention);
- ``SDPA + dense bool mask``: ``scaled_dot_product_attention`` with the dense bool mask;
- ``SDPA decomposition``: per sample, one causal SDPA call over ``[session ‖ summary]`` and one over
  ``[summary ‖ response]`` whose response rows are kept (two calls per sample; convret's own fallback);
- ``compiled FlexAttention``: ``torch.compile(flex_attention)`` with a BlockMask from the same ``mask_start``
  rule (forward only on CPU; compiled once per shape, ``dynamic=False``);
- ``flash-attn varlen``: two ``flash_attn_varlen_func`` calls for the whole batch (CUDA + flash-attn only),
  see :func:`varlen_decomposition`;
- ``convret``: :func:`convret.session_attention` (Triton on CUDA, the native backend on CPU).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from convret import SessionLayout, session_attention
from convret.ops.session_attention.cpu import fallback_session_attention
from convret.baselines import additive_mask, dense_mask_eager_attention, sdpa_dense_mask_attention

EAGER, SDPA_MASK, SDPA_DECOMP, FLEX, FLASH, CONVRET = (
    "dense-mask eager", "SDPA + dense bool mask", "SDPA decomposition", "compiled FlexAttention",
    "flash-attn varlen", "convret")
ALL_PEERS = (EAGER, SDPA_MASK, SDPA_DECOMP, FLEX, FLASH, CONVRET)
SHORT_NAMES = {"eager": EAGER, "sdpa-mask": SDPA_MASK, "sdpa-decomposition": SDPA_DECOMP, "flex": FLEX,
               "flash-varlen": FLASH, "convret": CONVRET}


@dataclass
class Peer:
    """One method under test. ``fn`` is None when it cannot run here; ``unavailable`` then says why."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    has_backward: bool = True
    unavailable: str | None = None
    note: str | None = None


# ------------------------------------------------------------------------------------------ useful work
def visible_pairs(layout: SessionLayout) -> int:
    """(query, key) pairs the mask lets through, counted from the segments (no L^2 tensor): a session of
    ``p + t`` tokens is causal over itself, each of the ``r`` response queries sees the ``t`` summary tokens
    and the response up to itself."""
    pairs = 0
    for row in layout.segments:
        for prefix_len, summary_len, response_len in row:
            n = prefix_len + summary_len
            pairs += n * (n + 1) // 2 + response_len * summary_len + response_len * (response_len + 1) // 2
    return pairs


def attention_flops(layout: SessionLayout, q_heads: int, head_dim: int, backward: bool) -> int:
    """Useful FLOPs: 4 D per visible pair and query head forward (QK^T and PV), 14 D forward + backward
    (the backward recomputes QK^T and runs four more products)."""
    return (14 if backward else 4) * head_dim * q_heads * visible_pairs(layout)


def estimated_bytes(name: str, layout: SessionLayout, q_heads: int, dtype: torch.dtype, backward: bool) -> int:
    """Rough peak bytes above the inputs, for the memory guard (the dense peers are O(B Hq L^2))."""
    batch, seq_len = layout.batch_size, layout.seq_len
    element = torch.finfo(dtype).bits // 8
    squares = batch * q_heads * seq_len**2
    if name == EAGER:  # scores, scaled + masked scores, fp32 probabilities and their cast, kept for backward
        return batch * seq_len**2 * element + squares * (3 * element + 4) * (2 if backward else 1)
    if name == SDPA_MASK:  # the bool mask, a float copy of it, and (math path) scores + probabilities
        return batch * seq_len**2 * (1 + element) + squares * 2 * max(element, 4) * (2 if backward else 1)
    return 0


# ------------------------------------------------------------------------------ flash-attn decomposition
@dataclass
class VarlenPlan:
    """Token indices and cumulative lengths of the two varlen calls of :func:`varlen_decomposition`."""

    session_index: torch.Tensor  # flat [B * L] positions of every [session ‖ summary] token, sample by sample
    session_cu: torch.Tensor  # int32 [samples + 1]
    session_max: int
    response_q_index: torch.Tensor  # flat positions of the response tokens (queries of call 2)
    response_q_cu: torch.Tensor
    response_q_max: int
    response_k_index: torch.Tensor  # flat positions of [summary ‖ response] (keys of call 2)
    response_k_cu: torch.Tensor
    response_k_max: int


def varlen_plan(layout: SessionLayout, device: torch.device | str) -> VarlenPlan:
    """Build the index plan once per layout (like convret's cached tile bounds)."""
    seq_len = layout.seq_len
    s_idx, s_len, q_idx, q_len, k_idx, k_len = [], [], [], [], [], []
    for b, row in enumerate(layout.segments):
        pos = b * seq_len
        for prefix_len, summary_len, response_len in row:
            session_end = pos + prefix_len + summary_len
            s_idx.append(torch.arange(pos, session_end))
            s_len.append(prefix_len + summary_len)
            if response_len > 0:
                q_idx.append(torch.arange(session_end, session_end + response_len))
                q_len.append(response_len)
                k_idx.append(torch.arange(pos + prefix_len, session_end + response_len))
                k_len.append(summary_len + response_len)
            pos = session_end + response_len

    def cu(lengths: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)

    return VarlenPlan(cat(s_idx), cu(s_len), max(s_len, default=0), cat(q_idx), cu(q_len), max(q_len, default=0),
                      cat(k_idx), cu(k_len), max(k_len, default=0))


def varlen_decomposition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, scale: float,
                         varlen_fn: Callable | None = None) -> torch.Tensor:
    """Session attention as two varlen calls over the whole batch (flash-attn's API):

    1. one causal call over every sample's ``[session ‖ summary]`` segment;
    2. one causal call of every sample's response queries against its ``[summary ‖ response]`` keys, with
       the causal diagonal aligned bottom-right (flash-attn >= 2.1: query i of r sees keys up to t + i).

    ``varlen_fn`` defaults to ``flash_attn.flash_attn_varlen_func``; the tests pass
    :func:`reference_varlen_attention` to check the index plan on CPU. Padding rows are zeros.
    Returns ``[B, Hq, L, D]``."""
    if varlen_fn is None:
        from flash_attn import flash_attn_varlen_func as varlen_fn
    batch, q_heads, seq_len, head_dim = q.shape
    # [B, H, L, D] -> [B * L, H, D]: flash-attn's token-major layout
    qt = q.transpose(1, 2).reshape(batch * seq_len, q_heads, head_dim)
    kt = k.transpose(1, 2).reshape(batch * seq_len, k.shape[1], head_dim)
    vt = v.transpose(1, 2).reshape(batch * seq_len, v.shape[1], head_dim)
    out = qt.new_zeros(qt.shape)
    if plan.session_index.numel():
        idx = plan.session_index
        part = varlen_fn(qt[idx], kt[idx], vt[idx], plan.session_cu, plan.session_cu, plan.session_max,
                         plan.session_max, softmax_scale=scale, causal=True)
        out = out.index_copy(0, idx, part)
    if plan.response_q_index.numel():
        qi, ki = plan.response_q_index, plan.response_k_index
        part = varlen_fn(qt[qi], kt[ki], vt[ki], plan.response_q_cu, plan.response_k_cu, plan.response_q_max,
                         plan.response_k_max, softmax_scale=scale, causal=True)
        out = out.index_copy(0, qi, part)
    return out.view(batch, seq_len, q_heads, head_dim).transpose(1, 2)


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_varlen_func`` semantics in plain PyTorch (one SDPA per segment, GQA,
    bottom-right causal alignment): a CPU oracle for the decomposition's index plan."""
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs = q[int(cu_seqlens_q[i]):int(cu_seqlens_q[i + 1])].transpose(0, 1)
        ks = k[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])].transpose(0, 1)
        vs = v[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])].transpose(0, 1)
        mask = None
        if causal:
            rows = torch.arange(qs.shape[1]).view(-1, 1) + (ks.shape[1] - qs.shape[1])
            mask = torch.arange(ks.shape[1]).view(1, -1) <= rows
        outs.append(F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                                   attn_mask=mask, scale=softmax_scale,
                                                   enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs)


def flash_attn_status(device: torch.device) -> str | None:
    """None when the flash-attn peer can run, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed" + ("" if device.type == "cuda" else "; no CUDA device")
    if device.type != "cuda":
        return "no CUDA device (flash-attn runs on CUDA only)"
    return None


# ----------------------------------------------------------------------------------------------- peers
def build_peers(layout: SessionLayout, dtype: torch.dtype, device: torch.device, names: list[str],
                scale: float) -> dict[str, Peer]:
    """The requested peers for this layout, dtype and device (masks and plans built here, outside timing)."""
    peers: dict[str, Peer] = {}
    layout = layout.to(device)
    for name in names:
        if name == EAGER:
            mask = additive_mask(layout, dtype)
            peers[name] = Peer(name, lambda q, k, v, mask=mask: dense_mask_eager_attention(q, k, v, mask, scale))
        elif name == SDPA_MASK:
            allowed = layout.dense_mask().unsqueeze(1)
            peers[name] = Peer(name, lambda q, k, v, m=allowed: sdpa_dense_mask_attention(q, k, v, m, scale))
        elif name == SDPA_DECOMP:
            peers[name] = Peer(name, lambda q, k, v: fallback_session_attention(q, k, v, layout, scale),
                               note="2 SDPA calls per sample")
        elif name == FLEX:
            peers[name] = _flex_peer(layout, device, scale)
        elif name == FLASH:
            why = flash_attn_status(device)
            if why:
                peers[name] = Peer(name, None, unavailable=why)
            else:
                plan = varlen_plan(layout, device)
                peers[name] = Peer(name, lambda q, k, v: varlen_decomposition(q, k, v, plan, scale),
                                   note="2 varlen calls per batch")
        elif name == CONVRET:
            backend = "triton" if device.type == "cuda" else "cpu"
            peers[name] = Peer(name, lambda q, k, v: session_attention(q, k, v, layout, scale, backend=backend),
                               note=f"backend={backend!r}")
        else:
            raise ValueError(f"unknown peer {name!r}; known: {list(ALL_PEERS)}")
    return peers


def _flex_peer(layout: SessionLayout, device: torch.device, scale: float) -> Peer:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return Peer(FLEX, None, unavailable="torch.nn.attention.flex_attention missing (torch < 2.5)")
    mask_start = layout.mask_start

    def session_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < mask_start[b, kv_idx])

    block_mask = torch.compile(create_block_mask)(session_mask, layout.batch_size, None, layout.seq_len,
                                                  layout.seq_len, device=str(device))
    compiled = torch.compile(flex_attention, dynamic=False)
    return Peer(FLEX, lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                has_backward=device.type == "cuda",
                note="compiled per shape (dynamic=False): every new shape recompiles" +
                     ("" if device.type == "cuda" else "; forward only on CPU"))
