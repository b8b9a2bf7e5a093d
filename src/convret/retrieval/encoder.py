"""Embedding with a retriever checkpoint: token sequences packed into rows by a token budget, the decoder only.

:func:`embed_sequences` is the one place embeddings are computed. Sequences are sorted by length and packed
back to back into rows of at most ``token_budget`` tokens, described by a :class:`convret.SessionLayout` (each
sequence attends causally to itself only, nothing is padded), and run through the decoder stack alone
(``model.model``: the LM head is never computed). The embedding is the final hidden state at each sequence's
last token, which is its last summary token. A sequence longer than the budget gets a row of its own, so one
long session costs memory linear in its length (the attention kernel never materialises ``L x L``).

Example::

    from convret.retrieval import Encoder
    enc = Encoder.from_checkpoint("runs/tiny/final")
    vectors = enc.encode_passages([Passage("d1", "some text")])       # float32 [1, dim]
    vectors = enc.encode_sessions([(history, "and its color?")])
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.records import Passage, Turn
from ..layout import SessionLayout
from . import _data

__all__ = ["Encoder", "decoder_of", "embed_sequences", "pack_by_budget", "DEFAULT_TOKEN_BUDGET"]

DEFAULT_TOKEN_BUDGET = 16384


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``*Model``) under a ``*ForCausalLM`` or a PEFT wrapper of one: hidden states without
    the LM head. LoRA layers live inside the decoder's modules, so an unmerged adapter still applies."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and hasattr(inner, "embed_tokens"):
        return inner
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    raise TypeError(f"cannot find the decoder stack of {type(model).__name__} (expected a *ForCausalLM)")


def pack_by_budget(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Rows of sequence indices, longest first, each row holding at most ``token_budget`` tokens (a longer
    sequence gets a row of its own). Consecutive in sorted order, so rows hold sequences of similar length."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    used = 0
    for i in order:
        if rows and used + lengths[i] <= token_budget:
            rows[-1].append(i)
            used += lengths[i]
        else:
            rows.append([i])
            used = lengths[i]
    return rows


@torch.no_grad()
def embed_sequences(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    normalize: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Embeddings ``[n, hidden]`` (float32, on CPU) of token sequences, in input order.

    Args:
        model: a ``*ForCausalLM`` (or PEFT wrapper) loaded with ``attn_implementation="convret"``.
        sequences: token ids, each ending with its summary tokens (the embedding is read at the last token).
        token_budget: tokens per forward pass (one packed row).
        normalize: L2-normalise the embeddings.
        progress: called with the number of sequences finished after each forward pass.
    """
    decoder = decoder_of(model)
    device = next(decoder.parameters()).device
    lengths = [len(s) for s in sequences]
    if any(n == 0 for n in lengths):
        raise ValueError(f"sequence {lengths.index(0)} is empty")
    hidden_size = decoder.config.hidden_size
    out = torch.empty(len(sequences), hidden_size, dtype=torch.float32)
    for row in pack_by_budget(lengths, token_budget):
        tokens = np.concatenate([np.asarray(sequences[i], dtype=np.int64) for i in row])
        layout = SessionLayout.from_segments([[(lengths[i], 0, 0) for i in row]], len(tokens), device=device)
        input_ids = torch.from_numpy(tokens)[None].to(device)
        hidden = decoder(input_ids=input_ids, position_ids=layout.position_ids(), session_layout=layout,
                         use_cache=False).last_hidden_state
        pos = layout.pooling_positions()
        emb = hidden[pos[:, 0], pos[:, 1]].float()
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out[torch.tensor(row)] = emb.cpu()
        if progress is not None:
            progress(len(row))
    return out


@dataclass
class Encoder:
    """A loaded checkpoint with its training-time formatter: text in, embeddings out.

    Attributes:
        model, tokenizer, config: from :func:`convret.train.checkpoint.load_retriever`.
        token_budget: tokens per forward pass.
        source: the checkpoint path (recorded in embedding metadata).
    """

    model: torch.nn.Module
    tokenizer: Any
    config: Any
    token_budget: int = DEFAULT_TOKEN_BUDGET
    source: str = ""

    def __post_init__(self) -> None:
        self.formatter = _data.formatter_for(self.tokenizer, self.config)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = "cpu",
                        dtype: torch.dtype | str | None = None, token_budget: int | None = DEFAULT_TOKEN_BUDGET,
                        merge: bool = False) -> "Encoder":
        """Load ``path`` (a convret checkpoint) for encoding: the one loading step of every command that runs
        a checkpoint (encode, evaluate, generate, serve, mine).

        Args:
            device: ``None``: this process's GPU (``cuda:LOCAL_RANK`` under torchrun) when CUDA is available,
                else the CPU.
            dtype: the model's dtype (a ``torch.dtype`` or its name, ``"bfloat16"``); ``None``: as saved.
            token_budget: tokens per forward pass (``None``: the default).

        Raises:
            ValueError: ``path`` is not a convret checkpoint or its parts do not belong together.
        """
        from ..train.checkpoint import load_retriever

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        token_budget = DEFAULT_TOKEN_BUDGET if token_budget is None else token_budget
        loaded = load_retriever(path, device=device, dtype=dtype, merge=merge)
        return cls(loaded.model, loaded.tokenizer, loaded.config, token_budget, str(path))

    @property
    def dim(self) -> int:
        return decoder_of(self.model).config.hidden_size

    def passage_tokens(self, passage: Passage | str) -> list[int]:
        return _data.passage_ids(self.formatter, self.config, passage)

    def session_tokens(self, history: Sequence[Turn], query: str) -> list[int]:
        return _data.session_ids(self.formatter, self.config, history, query)

    def embed_tokens(self, sequences: Sequence[Sequence[int]],
                     progress: Callable[[int], Any] | None = None) -> np.ndarray:
        return embed_sequences(self.model, sequences, self.token_budget, self.config.normalize, progress).numpy()

    def encode_passages(self, passages: Sequence[Passage | str]) -> np.ndarray:
        """float32 ``[n, dim]`` passage embeddings."""
        return self.embed_tokens([self.passage_tokens(p) for p in passages])

    def encode_sessions(self, sessions: Sequence[tuple[Sequence[Turn], str]]) -> np.ndarray:
        """float32 ``[n, dim]`` embeddings of ``(history, query)`` sessions."""
        return self.embed_tokens([self.session_tokens(h, q) for h, q in sessions])
