"""Hugging Face integration: ``import convret.hf`` registers the attention implementation ``"convret"``.

Select it like any built-in implementation::

    import convret.hf  # noqa: F401  (registration; idempotent, do it in every process)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="convret")
    # or: model.set_attn_implementation("convret")   (also through a PEFT wrapper)
    out = model(input_ids, session_layout=layout, position_ids=layout.position_ids(), use_cache=False)

The ``session_layout`` keyword reaches every layer's attention call unchanged (also under gradient
checkpointing, PEFT and torch.compile) and selects :func:`convret.session_attention`. Without it the
implementation is ordinary causal attention (PyTorch SDPA): a 2-D padding ``attention_mask`` is honoured, a
4-D mask passed by the caller is used as given, and with a KV cache (query length < key length) the queries
attend causally over the cache (bottom-right aligned), which is what ``generate()`` needs.

No modeling file is patched and no model class is touched: only ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface`` get an entry named ``"convret"``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .attention import session_attention
from .layout import SessionLayout

ATTN_IMPLEMENTATION = "convret"

__all__ = ["ATTN_IMPLEMENTATION", "convret_attention_forward", "convret_padding_mask", "register"]


def convret_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    session_layout: SessionLayout | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"convret"``.

    Args:
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (GQA heads not expanded).
        attention_mask: ``None`` (no padding), a bool ``[B, Lk]`` padding mask (True = real token, built by
            :func:`convret_padding_mask`), or a 4-D mask the caller passed to the model (bool or additive float).
            Ignored when ``session_layout`` is given: the layout holds the padding.
        scaling: softmax scale (the model's ``head_dim ** -0.5`` by default).
        dropout: attention dropout probability; only the plain causal path supports it.
        session_layout: the batch's :class:`convret.SessionLayout` (``[B, L]``), routed in as a model keyword.
        sliding_window: passed by Mistral / Qwen2 layers; supported only when no sequence exceeds it.

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``: no attention weights are ever materialised.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if sliding_window is not None and kv_len > sliding_window:
        raise NotImplementedError(
            f"attn_implementation='convret' does not implement sliding-window attention: sequence length {kv_len} "
            f"exceeds the layer's sliding_window={sliding_window}"
        )
    if session_layout is not None:
        if q_len != kv_len:
            raise ValueError(
                f"session_layout needs query and key of the same length (no KV cache); got {q_len} queries and "
                f"{kv_len} keys. Pass use_cache=False when training."
            )
        if dropout > 0.0:
            raise NotImplementedError(
                "attention dropout is not supported with session_layout; set config.attention_dropout = 0.0"
            )
        out = session_attention(query, key, value, session_layout, scale=scaling)
    else:
        out = _causal_attention(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def _causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """SDPA causal attention, bottom-right aligned when a KV cache makes ``Lq < Lk``. Returns ``[B, Hq, Lq, D]``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    mask = None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len]  # the caller's own 4-D mask, used as given
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
    elif attention_mask is not None or q_len != kv_len:
        if q_len == 1 and attention_mask is None:
            mask = None  # a single new query sees the whole cache
        else:
            offset = kv_len - q_len
            rows = torch.arange(q_len, device=query.device).view(-1, 1) + offset
            cols = torch.arange(kv_len, device=query.device).view(1, -1)
            mask = (cols <= rows).view(1, 1, q_len, kv_len)
            if attention_mask is not None:
                padding = attention_mask[:, -kv_len:].to(device=query.device, dtype=torch.bool)
                mask = mask & padding.view(padding.shape[0], 1, 1, kv_len)
                # a padding query (left padding) sees nothing: let it see its own key so that SDPA stays finite;
                # its output is never used
                diagonal = (cols == rows).view(1, 1, q_len, kv_len)
                mask = mask | (diagonal & ~mask.any(-1, keepdim=True))
    if mask is None and q_len == kv_len:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )


def convret_padding_mask(
    batch_size: int | None = None,
    kv_length: int | None = None,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask builder registered as ``"convret"`` in ``AttentionMaskInterface``.

    Keeps the model's 2-D padding mask instead of a dense ``[B, 1, Lq, Lk]`` one: returns ``None`` when there
    is no padding (the common training case, the layout then carries everything) or a bool ``[B, kv_length]``
    mask (True = real token) that :func:`convret_attention_forward` combines with causality itself.
    Keyword-only in practice: transformers 5.x passes ``q_length``/``q_offset``, 4.57 ``cache_position``."""
    if attention_mask is None:
        return None
    if kv_length is None:
        kv_length = attention_mask.shape[-1] - kv_offset
    padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if padding.shape[-1] < kv_length:  # static caches are longer than the mask: unwritten slots are not real
        padding = F.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
    if not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding


def register() -> None:
    """Register ``"convret"`` with transformers (idempotent; runs on ``import convret.hf``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, convret_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, convret_padding_mask)


register()
