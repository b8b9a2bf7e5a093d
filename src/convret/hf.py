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
attend causally over the cache (bottom-right aligned), which is what ``generate()`` needs. Caches whose keys do
not end at the queries (a static cache before it fills) get transformers' own 4-D mask from the mask builder.

Packed rows without a layout: when ``position_ids`` restart inside a row (several samples back to back, as
``DataCollatorWithFlattening`` builds them), each sample attends only to itself. In eager mode the restarts
become a :class:`convret.SessionLayout` of plain causal samples (one host sync per forward pass, shared by every
layer); under torch.compile, where that sync cannot happen, SDPA gets the same block-diagonal causal mask
densely, as transformers' own SDPA path does. A packed row whose padding is not at its end raises.

A layer's ``sliding_window`` (Mistral, Qwen2 / Qwen3 with ``use_sliding_window``) is honoured on every path: the
session kernels take it as a lower bound per query row, the SDPA paths as a band in their mask.
``output_attentions=True`` computes that call densely, as eager does, and returns the weights.

Every keyword transformers passes is either used, ignored because it cannot change the result
(:data:`IGNORED_KEYWORDS`: cache bookkeeping, loss arguments such as ``shift_labels``, output flags), or refused
with advice (:data:`REFUSED_KEYWORDS`: ``softcap``, attention sinks, FlashAttention's varlen offsets, ...);
``is_causal=False`` and any unknown keyword whose value is not None are refused too.

No modeling file is patched and no model class is touched: only ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface`` get an entry named ``"convret"``.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .layout import SessionLayout, check_window
from .ops.session_attention import SUPPORTED_HEAD_DIMS, session_attention

if TYPE_CHECKING:
    from .ops.session_attention.cached import CachedPrefill

ATTN_IMPLEMENTATION = "convret"

__all__ = ["ATTN_IMPLEMENTATION", "IGNORED_KEYWORDS", "REFUSED_KEYWORDS", "convret_attention_forward",
           "convret_padding_mask", "register"]

# Keywords that reach the attention function and cannot change its result, with the reason (docs/hf.md's table).
# transformers hands the model call's keywords down to every layer, so the loss's own arguments arrive here too.
IGNORED_KEYWORDS: dict[str, str] = {
    "use_cache": "cache bookkeeping: the keys and values the layer passes already include the cache",
    "cache_position": "cache bookkeeping (the mask builder reads the query offsets)",
    "past_key_values": "the cache object: the layer has already read it",
    "past_key_value": "the cache object (its older, singular name)",
    "cache": "the cache object (its name in transformers 5.25)",
    "layer_idx": "the layer's index; the module carries it",
    "num_items_in_batch": "loss normalisation (gradient accumulation), read by the loss",
    "ignore_index": "the loss's label to skip",
    "shift_labels": "labels already shifted for the loss",
    "output_hidden_states": "output selection, done outside attention",
    "output_router_logits": "output selection of mixture-of-experts layers",
    "return_dict": "output format",
    "seq_idx": "packed-sample ids for state-space layers; attention reads packing from position_ids, as the "
               "mask transformers builds for SDPA and eager does",
    "max_length_q": "FlashAttention varlen size hint: no effect without cu_seq_lens_q (refused)",
    "max_length_k": "FlashAttention varlen size hint: no effect without cu_seq_lens_k (refused)",
    "deterministic": "FlashAttention's deterministic-backward switch; convret's kernels are deterministic",
}

# Keywords that would change the result and are refused when not None, with what to do instead.
_VARLEN_ADVICE = ("FlashAttention's varlen offsets: convret finds packed samples from position_ids (restarting at "
                  "each sample), which DataCollatorWithFlattening returns too; build it with "
                  "return_flash_attn_kwargs=False, or use attn_implementation='flash_attention_2'")
REFUSED_KEYWORDS: dict[str, str] = {
    "softcap": "logit soft-capping (Gemma-2) changes every score; use attn_implementation='eager' or "
               "'flex_attention'",
    "s_aux": "attention sinks (a per-head logit in the softmax, GPT-OSS); use attn_implementation='eager'",
    "sinks": "attention sinks (a per-head logit in the softmax); use attn_implementation='eager'",
    "cu_seq_lens_q": _VARLEN_ADVICE,
    "cu_seq_lens_k": _VARLEN_ADVICE,
    "position_bias": "an additive position bias (T5-style) changes every score; use attn_implementation='sdpa' "
                     "or 'eager'",
    "head_mask": "a per-head multiplier of the attention weights; use attn_implementation='eager'",
}


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as ``"convret"``.

    Args:
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (GQA heads not expanded).
        attention_mask: ``None`` (no padding), a bool ``[B, Lk]`` padding mask (True = real token, built by
            :func:`convret_padding_mask`), or a 4-D mask (bool or additive float: the caller's own, or the one
            transformers builds for a cache whose keys do not end at the queries), used as given.
            Ignored when ``session_layout`` is given: the layout holds the padding.
        scaling: softmax scale (the model's ``head_dim ** -0.5`` by default).
        dropout: attention dropout probability (training); refused with ``session_layout`` or ``cached_prefill``.
        session_layout: the batch's :class:`convret.SessionLayout` (``[B, L]``), routed in as a model keyword.
        sliding_window: the layer's window (Mistral, Qwen2 / Qwen3 sliding layers): query q sees key j only if
            ``q - j < sliding_window``, with or without a layout, packed or padded, with or without a cache.
            A 4-D mask is taken as given (it already holds whatever window its builder meant).
        cached_prefill: a :class:`convret.ops.session_attention.cached.CachedPrefill` (a model keyword, like
            ``session_layout``): the model runs on new tokens only and their queries attend to the cached keys
            and values it holds plus their own (:func:`convret.ops.session_attention.cached.cached_session_attention`).
        **kwargs: ``position_ids`` (read to find packed rows), ``output_attentions`` (or the model config's:
            compute this call densely and return the weights), ``is_causal`` (True only), the keywords of
            :data:`IGNORED_KEYWORDS`; the others raise ``NotImplementedError`` (:data:`REFUSED_KEYWORDS`, unknown
            ones) when their value is not None.

    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``, or with ``output_attentions`` the weights ``[B, Hq, Lq, Lk]`` in
        place of None: those of eager attention on every row that sees a key (rows that see none, padding, get
        zeros where eager spreads them evenly).
    """
    _check_keywords(kwargs)
    window = _layer_window(sliding_window)
    want_weights = _wants_attention_weights(module, kwargs)
    query, key, value = _autocast_inputs(query, key, value)
    if cached_prefill is not None:
        return _cached_prefill_attention(module, query, key, value, scaling, dropout, cached_prefill, window,
                                         want_weights)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if session_layout is not None:
        if q_len != kv_len:
            raise ValueError(
                f"session_layout needs query and key of the same length (no KV cache); got {q_len} queries and "
                f"{kv_len} keys. Pass use_cache=False when training."
            )
        if dropout > 0.0:
            raise NotImplementedError(
                "attention dropout is not supported with session_layout; set config.attention_dropout = 0.0 (or "
                "call model.eval())"
            )
    position_ids = kwargs.get("position_ids")
    packed_mask = None
    if session_layout is None and q_len == kv_len and (attention_mask is None or attention_mask.dim() == 2):
        if torch.compiler.is_compiling():  # no host sync: the packed samples' mask densely, as transformers does
            packed_mask = _packed_causal_mask(position_ids, attention_mask, batch, kv_len, window)
        else:
            session_layout = _layout_from_position_ids(position_ids, attention_mask, batch, kv_len)
            kernels_fit = dropout == 0.0 and query.shape[-1] in SUPPORTED_HEAD_DIMS
            if session_layout is not None and not kernels_fit:  # dropout in training, or an odd head dim: SDPA
                session_layout = None
                packed_mask = _packed_causal_mask(position_ids, attention_mask, batch, kv_len, window)
            elif (session_layout is None and attention_mask is None and window is not None and window < kv_len
                  and kernels_fit):
                session_layout = _plain_layout(batch, kv_len)  # one sample per row: the window's tiles are skipped
    if want_weights:
        if packed_mask is None and session_layout is not None:
            mask = session_layout.to(query.device).dense_mask(window).unsqueeze(1)
        else:
            mask = packed_mask if packed_mask is not None else _causal_mask(query, key, attention_mask, window)
        return _eager_attention(module, query, key, value, mask, scaling, dropout)
    if packed_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=packed_mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    elif session_layout is not None:
        out = session_attention(query, key, value, session_layout, scale=scaling, window=window)
    else:
        out = _causal_attention(query, key, value, attention_mask, scaling, dropout, window)
    return out.transpose(1, 2).contiguous(), None


def _cached_prefill_attention(module, query, key, value, scaling, dropout, prefill, window, want_weights):
    from .ops.session_attention.cached import cached_session_attention, dense_cached_mask

    if key.shape[2] != prefill.query_positions.shape[1]:
        raise ValueError(f"cached_prefill holds {prefill.query_positions.shape[1]} new tokens per row but the layer "
                         f"got {key.shape[2]} keys: pass use_cache=False and no past_key_values with it")
    if dropout > 0.0:
        raise NotImplementedError("attention dropout is not supported with cached_prefill (call model.eval())")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"cached_prefill needs the attention module's layer_idx ({type(module).__name__} has none)")
    key, value = prefill.keys_values(layer_idx, key, value)
    if want_weights:
        layout = prefill.layout.to(query.device)
        mask = dense_cached_mask(layout, prefill.query_positions.to(query.device), window).unsqueeze(1)
        return _eager_attention(module, query, key, value, mask, scaling, dropout)
    out = cached_session_attention(query, key, value, prefill.layout, prefill.query_positions, scale=scaling,
                                   window=window)
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


def _check_keywords(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if value is None or name in IGNORED_KEYWORDS or name in ("position_ids", "output_attentions"):
            continue
        if name == "is_causal":
            if value is True:
                continue
            raise NotImplementedError(
                f"attn_implementation='convret' is causal only, got is_causal={value!r} (a bidirectional or "
                "encoder layer); use attn_implementation='sdpa' for this model"
            )
        advice = REFUSED_KEYWORDS.get(
            name, "an attention keyword convret does not know, so it may change the result; use "
                  "attn_implementation='sdpa' or 'eager' for this model")
        raise NotImplementedError(
            f"attn_implementation='convret' does not implement the attention keyword {name}={_short(value)}: "
            f"{advice}"
        )


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)


def _layer_window(sliding_window: Any) -> int | None:
    try:
        return check_window(sliding_window)
    except ValueError:
        raise ValueError(f"the layer passed sliding_window={sliding_window!r}: expected None or a positive number "
                         "of keys (config.sliding_window)") from None


def _wants_attention_weights(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """``output_attentions`` of this call: the keyword when given, else the model config's (transformers reads
    the config the same way when it decides to record the weights, and then passes no keyword)."""
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return flag is True


def _eager_attention(module, query, key, value, mask, scaling, dropout) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention computed densely, as transformers' eager implementation does, returning the weights:
    ``softmax(q k^T * scaling + mask)`` in fp32, cast to the query's dtype, dropout, times v. ``mask``: bool
    (True = attend; rows with no visible key get zero weights) or additive float, ``[B or 1, 1, Lq, Lk]``."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None and mask.dtype == torch.bool:
        weights = weights.masked_fill(~mask, 0.0)
    weights = F.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


# position_ids tensor -> (its version, the attention_mask it was seen with, the layout built or None)
_PACKED_LAYOUTS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _sample_ids(position_ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` index of the packed sample of each token: a new sample starts where the position id is not
    the previous one + 1 between two real tokens (padding positions carry arbitrary ids)."""
    step_ok = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if real is not None:
        step_ok = step_ok | ~(real[:, 1:] & real[:, :-1])
    first = torch.zeros(position_ids.shape[0], 1, dtype=torch.bool, device=position_ids.device)
    starts = torch.cat([first, ~step_ok], dim=1)
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


@functools.lru_cache(maxsize=16)
def _plain_layout(batch: int, length: int) -> SessionLayout:
    """``batch`` rows of one causal sample of ``length`` tokens (kept, so that every layer and call reuses its tile
    metadata)."""
    return SessionLayout.from_segments([[(length, 0, 0)]] * batch, length)


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


def _packed_causal_mask(position_ids, attention_mask, batch, length, window=None) -> torch.Tensor | None:
    """Traceable twin of :func:`_layout_from_position_ids`: a bool ``[B, 1, L, L]`` causal mask within each
    packed sample (and over real keys, and inside ``window``), or None without position_ids."""
    position_ids, real = _normalised_inputs(position_ids, attention_mask, batch, length)
    if position_ids is None:
        return None
    sample_ids = _sample_ids(position_ids, real)
    positions = torch.arange(length, device=position_ids.device)
    offset = positions.view(-1, 1) - positions.view(1, -1)  # query - key
    causal = offset >= 0 if window is None else (offset >= 0) & (offset < window)
    mask = causal.unsqueeze(0) & (sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1))
    if real is not None:
        mask = mask & real.unsqueeze(1)
        diagonal = torch.eye(length, dtype=torch.bool, device=mask.device).unsqueeze(0)
        mask = mask | (diagonal & ~mask.any(-1, keepdim=True))  # a padding query sees itself: SDPA stays finite
    return mask.unsqueeze(1)


def _causal_mask(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                 window: int | None, need_mask: bool = True) -> torch.Tensor | None:
    """The mask of the plain causal path, ``[B or 1, 1, Lq, Lk]``: a 4-D ``attention_mask`` as given (bool, or
    additive float in the query's dtype); otherwise causal attention of the queries over the keys, aligned at
    the end (bottom-right: the last query is the last key), inside ``window``, over the real keys of a 2-D
    padding mask. A padding query (left padding) that would see no key sees its own, so that SDPA stays
    finite; its output is never used. ``need_mask=False``: None where SDPA needs no mask (plain causal, or one
    query over a whole cache)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len]  # the caller's own 4-D mask, or transformers' for a static cache
        return mask if mask.dtype == torch.bool else mask.to(query.dtype)
    banded = window is not None and window < kv_len
    if not need_mask and attention_mask is None and not banded and (q_len == kv_len or q_len == 1):
        return None
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=query.device).view(-1, 1) + offset
    cols = torch.arange(kv_len, device=query.device).view(1, -1)
    mask = cols <= rows
    if banded:
        mask = mask & (cols > rows - window)
    mask = mask.view(1, 1, q_len, kv_len)
    if attention_mask is not None:
        padding = attention_mask[:, -kv_len:].to(device=query.device, dtype=torch.bool)
        mask = mask & padding.view(padding.shape[0], 1, 1, kv_len)
        diagonal = (cols == rows).view(1, 1, q_len, kv_len)
        mask = mask | (diagonal & ~mask.any(-1, keepdim=True))
    return mask


def _causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    window: int | None = None,
) -> torch.Tensor:
    """SDPA causal attention, bottom-right aligned when a KV cache makes ``Lq < Lk``. Returns ``[B, Hq, Lq, D]``."""
    gqa = query.shape[1] != key.shape[1]
    mask = _causal_mask(query, key, attention_mask, window, need_mask=False)
    is_causal = mask is None and query.shape[2] == key.shape[2]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, scale=scaling, enable_gqa=gqa
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
    mask (True = real token) that :func:`convret_attention_forward` combines with causality and the layer's
    window itself. That needs the queries to be the last keys (no cache, a dynamic cache, a sliding-window
    cache); where they are not (a static cache before it fills) it returns transformers' own 4-D SDPA mask,
    which the attention function uses as given. Keyword-only in practice (transformers passes ``q_length`` and
    ``q_offset``)."""
    if kv_length is not None and not _queries_end_the_keys(kv_length, kv_offset, kwargs):
        return _transformers_sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                                       attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    if kv_length is None:
        kv_length = attention_mask.shape[-1] - kv_offset
    padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if padding.shape[-1] < kv_length:  # a cache longer than the mask: slots not written yet are not real
        padding = F.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
    if not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding


def _queries_end_the_keys(kv_length: int, kv_offset: int, kwargs: dict[str, Any]) -> bool:
    """Whether the query positions are the last ``q_length`` of the keys ``kv_offset .. kv_offset + kv_length - 1``
    (False where that cannot be read without a host sync under torch.compile)."""
    q_length, q_offset = kwargs.get("q_length"), kwargs.get("q_offset", 0)
    if q_length is None:  # called without the query's extent: nothing to compare
        return True
    if isinstance(q_offset, torch.Tensor):  # a static cache's offset
        if torch.compiler.is_compiling():
            return False
        q_offset = int(q_offset)
    return q_offset + q_length == kv_offset + kv_length


def _transformers_sdpa_mask(**kwargs: Any) -> torch.Tensor:
    """transformers' own SDPA mask builder, always materialised: a bool ``[B, 1, Lq, Lk]`` mask with every term
    of the mask function it was given (causality at the true query positions, window, padding)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    kwargs["allow_is_causal_skip"] = False
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"](**kwargs)


def register() -> None:
    """Register ``"convret"`` with transformers (idempotent; runs on ``import convret.hf``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, convret_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, convret_padding_mask)


register()
