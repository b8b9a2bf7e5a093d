"""The t summary tokens ``EMB_1..EMB_t`` appended to every session and passage (the embedding is read at the
last one) and placed between a session and its response.

Either new special tokens (``<|emb_0|>``, ``<|emb_1|>``, ...) are added to the tokenizer and the model's
embeddings grow to hold them, the new rows initialised to the mean of the existing rows (a deterministic,
in-distribution start), or tokens the vocabulary already reserves are reused by name (Qwen-v1's
``<|extra_0|>`` ...), as ChatRetriever does on Qwen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["SummaryTokens", "add_summary_tokens", "summary_token_name", "DEFAULT_NUM_SUMMARY_TOKENS"]

DEFAULT_NUM_SUMMARY_TOKENS = 3


def summary_token_name(index: int) -> str:
    return f"<|emb_{index}|>"


@dataclass(frozen=True)
class SummaryTokens:
    """Which tokens serve as summary tokens. ``added``: new tokens (and, when a model was given and its
    vocabulary was too small, new embedding rows) were created by this call."""

    tokens: list[str]
    ids: list[int]
    added: bool


def add_summary_tokens(
    model: torch.nn.Module | None,
    tokenizer: Any,
    num_tokens: int = DEFAULT_NUM_SUMMARY_TOKENS,
    reuse: Sequence[str] | None = None,
) -> SummaryTokens:
    """Make ``tokenizer`` (and ``model``, when given) ready for ``num_tokens`` summary tokens.

    Args:
        model: a Hugging Face model (``*ForCausalLM`` or base model), or ``None`` for the tokenizer alone.
        tokenizer: a Hugging Face tokenizer; modified in place.
        num_tokens: t, the number of summary tokens (ChatRetriever uses 3).
        reuse: names of existing tokens to use instead of adding new ones (``len(reuse) == num_tokens``).

    Idempotent: a tokenizer saved after this call and loaded again already holds the tokens, and a second call
    returns the same ids without touching the embeddings.

    Returns:
        :class:`SummaryTokens` with the ids to pass to :class:`convret.CSITCollator`.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if reuse is not None:
        tokens = list(reuse)
        if len(tokens) != num_tokens:
            raise ValueError(f"reuse names {len(tokens)} tokens but num_tokens is {num_tokens}")
        ids = [_existing_id(tokenizer, token) for token in tokens]
        missing = [token for token, i in zip(tokens, ids) if i is None]
        if missing:
            raise ValueError(f"tokens to reuse are not in the tokenizer's vocabulary: {missing}")
        _check_model_rows(model, ids)
        return SummaryTokens(tokens, ids, added=False)

    tokens = [summary_token_name(i) for i in range(num_tokens)]
    existing = [_existing_id(tokenizer, token) for token in tokens]
    if all(i is not None for i in existing):
        _check_model_rows(model, existing)
        return SummaryTokens(tokens, existing, added=False)
    known_rows = len(tokenizer)
    # keep the tokenizer's other extra special tokens (transformers 5 replaces them by default)
    keep_others = {"replace_extra_special_tokens": False} if _accepts_replace_flag(tokenizer) else {}
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, **keep_others)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    if model is not None:
        _grow_embeddings(model, len(tokenizer), known_rows, ids)
    return SummaryTokens(tokens, ids, added=True)


def _existing_id(tokenizer: Any, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def _accepts_replace_flag(tokenizer: Any) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def _check_model_rows(model: torch.nn.Module | None, ids: Sequence[int]) -> None:
    if model is None:
        return
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        raise ValueError(f"summary token id {max(ids)} is outside the model's {rows} embedding rows: the tokenizer "
                         "does not belong to this model, or its embeddings were not resized")


@torch.no_grad()
def _grow_embeddings(model: torch.nn.Module, vocab_size: int, known_rows: int, new_ids: Sequence[int]) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    known = min(known_rows, rows)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    index = torch.tensor(list(new_ids), dtype=torch.long, device=matrices[0].device)
    for weight in matrices:
        mean = weight[:known].float().mean(0).to(weight.dtype)
        weight.index_copy_(0, index, mean.expand(len(new_ids), -1).contiguous())
