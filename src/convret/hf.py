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

Packed rows without a layout: when ``position_ids`` restart inside a row (several samples back to back, as
``DataCollatorWithFlattening`` builds them), each sample attends only to itself. In eager mode the restarts
become a :class:`convret.SessionLayout` of plain causal samples (one host sync per forward pass, shared by every
layer); under torch.compile, where that sync cannot happen, SDPA gets the same block-diagonal causal mask
densely, as transformers' own SDPA path does. A packed row whose padding is not at its end raises.

Keywords the implementation cannot honour raise instead of being dropped: ``softcap`` (Gemma-2),
``s_aux`` / ``sinks`` (attention sinks), ``is_causal=False`` (bidirectional layers), FlashAttention's varlen
``cu_seq_lens_*`` / ``max_length_*``, ``head_mask`` and any other unknown keyword with a value other than None.

No modeling file is patched and no model class is touched: only ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface`` get an entry named ``"convret"``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .ops.session_attention import session_attention
from .layout import SessionLayout

if TYPE_CHECKING:
    from .ops.session_attention.cached import CachedPrefill

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
    cached_prefill: "CachedPrefill | None" = None,
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
        sliding_window: passed by Mistral / Qwen2 layers; supported only when no query is further than the
            window from a key it may see (with a layout: within each sample, so packed rows longer than the
            window are fine as long as their samples are not).
        cached_prefill: a :class:`convret.ops.session_attention.cached.CachedPrefill` (a model keyword, like
            ``session_layout``): the model runs on new tokens only and their queries attend to the cached keys
            and values it holds plus their own (:func:`convret.ops.session_attention.cached.cached_session_attention`).
        **kwargs: ``position_ids`` (read to find packed rows), ``use_cache`` and the other keywords
            transformers always passes; any keyword that would change the result raises (see the module
            docstring).

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``: no attention weights are ever materialised.
    """
    _check_keywords(kwargs)
    query, key, value = _autocast_inputs(query, key, value)
    if cached_prefill is not None:
        return _cached_prefill_attention(module, query, key, value, scaling, dropout, cached_prefill,
                                         sliding_window)
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    packed_mask = None
    if session_layout is None and q_len == kv_len and (attention_mask is None or attention_mask.dim() == 2):
        if torch.compiler.is_compiling():
            packed_mask = _packed_causal_mask(position_ids, attention_mask, query.shape[0], kv_len)
        else:
            session_layout = _layout_from_position_ids(position_ids, attention_mask, query.shape[0], kv_len)
    if sliding_window is not None:
        _check_sliding_window(sliding_window, session_layout, kv_len)
    if packed_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=packed_mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    elif session_layout is not None:
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


def _cached_prefill_attention(module, query, key, value, scaling, dropout, prefill, sliding_window):
    from .ops.session_attention.cached import cached_session_attention

    if key.shape[2] != prefill.query_positions.shape[1]:
        raise ValueError(f"cached_prefill holds {prefill.query_positions.shape[1]} new tokens per row but the layer "
                         f"got {key.shape[2]} keys: pass use_cache=False and no past_key_values with it")
    if dropout > 0.0:
        raise NotImplementedError("attention dropout is not supported with cached_prefill (call model.eval())")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"cached_prefill needs the attention module's layer_idx ({type(module).__name__} has none)")
    key, value = prefill.keys_values(layer_idx, key, value)
    if sliding_window is not None:
        _check_sliding_window(sliding_window, prefill.layout, key.shape[2])
    out = cached_session_attention(query, key, value, prefill.layout, prefill.query_positions, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _autocast_inputs(query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, attention runs in the autocast dtype, as ``scaled_dot_product_attention`` does: the
    rotary embedding leaves q and k in fp32 (fp32 cos / sin) while v comes out of a bf16 matmul."""
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return query.to(dtype), key.to(dtype), value.to(dtype)


# Keywords transformers passes that do not change the attention result (or are read above).
_HARMLESS_KEYWORDS = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "layer_idx", "num_items_in_batch",
    "output_hidden_states", "return_dict",
})


def _check_keywords(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _HARMLESS_KEYWORDS or value is None:
            continue
        if name == "is_causal":
            if value is True:
                continue
            raise NotImplementedError(
                f"attn_implementation='convret' is causal only, got is_causal={value!r} (a bidirectional or "
                "encoder layer); use attn_implementation='sdpa' for this model"
            )
        if name == "output_attentions" and not value:
            continue
        raise NotImplementedError(
            f"attn_implementation='convret' does not implement the attention keyword {name}={_short(value)} "
            "(it would change the result; e.g. softcap, attention sinks, varlen FlashAttention offsets); use "
            "attn_implementation='sdpa' or 'eager' for this model"
        )


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)


def _check_sliding_window(window: int, layout: SessionLayout | None, kv_len: int) -> None:
    if layout is not None:
        span = layout.max_attention_span()
        if span < window:
            return
        raise NotImplementedError(
            f"attn_implementation='convret' does not implement sliding-window attention: a query of the layout "
            f"sees a key {span} positions back, the layer's sliding_window={window} would hide it (samples "
            f"must be at most {window} tokens)"
        )
    if kv_len > window:
        raise NotImplementedError(
            f"attn_implementation='convret' does not implement sliding-window attention: sequence length {kv_len} "
            f"exceeds the layer's sliding_window={window}"
        )


# position_ids tensor -> (its version, the attention_mask it was seen with, the layout built or None)
_PACKED_LAYOUTS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _sample_ids(position_ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` index of the packed sample of each token: a new sample starts where the position id is not
    the previous one + 1 between two real tokens (padding positions carry arbitrary ids)."""
    step_ok = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if real is not None:
        step_ok = step_ok | ~(real[:, 1:] & real[:, :-1])
    starts = torch.cat([torch.zeros_like(step_ok[:, :1]), ~step_ok], dim=1)
    return starts.cumsum(-1)


def _normalised_inputs(position_ids, attention_mask, batch, length):
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None, None
    position_ids = position_ids.expand(batch, -1)
    real = None if attention_mask is None else attention_mask[:, -length:].to(position_ids.device, torch.bool)
    return position_ids, real


def _layout_from_position_ids(position_ids, attention_mask, batch, length) -> SessionLayout | None:
    """The layout of packed rows (None when no row restarts its position ids)."""
    key = position_ids
    position_ids, real = _normalised_inputs(position_ids, attention_mask, batch, length)
    if position_ids is None:
        return None
    cached = _PACKED_LAYOUTS.get(key)
    if cached is not None and cached[0] == key._version and cached[1] is attention_mask:
        return cached[2]
    sample_ids = _sample_ids(position_ids, real)
    layout = None
    if bool((sample_ids[:, -1] > 0).any()):
        layout = _packed_layout(sample_ids.cpu(), None if real is None else real.cpu(), length)
    _PACKED_LAYOUTS[key] = (key._version, attention_mask, layout)
    return layout


def _packed_layout(sample_ids: torch.Tensor, real: torch.Tensor | None, length: int) -> SessionLayout:
    rows = []
    for b in range(sample_ids.shape[0]):
        num_real = length if real is None else int(real[b].sum())
        if real is not None and not bool(real[b, :num_real].all()):
            raise ValueError(
                f"row {b} packs several samples (its position_ids restart) and has padding that is not at its "
                "end: attn_implementation='convret' cannot tell the samples apart. Pad on the right, or pass "
                "session_layout=convret.SessionLayout.from_segments(...) to the model"
            )
        counts = torch.bincount(sample_ids[b, :num_real]).tolist() if num_real else []
        rows.append([(n, 0, 0) for n in counts if n > 0])
    return SessionLayout.from_segments(rows, length)


def _packed_causal_mask(position_ids, attention_mask, batch, length) -> torch.Tensor | None:
    """Traceable twin of :func:`_layout_from_position_ids`: a bool ``[B, 1, L, L]`` causal mask within each
    packed sample (and over real keys), or None without position_ids."""
    position_ids, real = _normalised_inputs(position_ids, attention_mask, batch, length)
    if position_ids is None:
        return None
    sample_ids = _sample_ids(position_ids, real)
    positions = torch.arange(length, device=position_ids.device)
    mask = (positions.view(1, -1) <= positions.view(-1, 1)).unsqueeze(0)
    mask = mask & (sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1))
    if real is not None:
        mask = mask & real.unsqueeze(1)
        diagonal = torch.eye(length, dtype=torch.bool, device=mask.device).unsqueeze(0)
        mask = mask | (diagonal & ~mask.any(-1, keepdim=True))  # a padding query sees itself: SDPA stays finite
    return mask.unsqueeze(1)


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
