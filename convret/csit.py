"""The CSIT objective (ChatRetriever, Mao et al., ACL 2024 Findings): ``L = L_C + alpha * L_S``.

- ``L_C``: InfoNCE of each session embedding against its positive, hard negatives and all other in-batch
  passages (:func:`convret.info_nce`, tau = 0.01 on L2-normalised embeddings);
- ``L_S``: the session-masked LM loss on the responses (:func:`convret.linear_cross_entropy`, never
  materialising full-vocabulary logits; ChatRetriever's released code smooths labels with 0.1).

``alpha`` defaults to 0.2 as in the released code (the paper reports 0.3).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .collate import CSITBatch, pool_hidden
from .contrastive import info_nce
from .lm_loss import linear_cross_entropy

__all__ = ["CSITLoss", "CSITLossOutput", "csit_loss"]


class CSITLossOutput(NamedTuple):
    """``loss = contrastive + alpha * generation``, fp32 scalars. The parts keep their graph: detach them (or
    call ``.item()``) for logging."""

    loss: torch.Tensor
    contrastive: torch.Tensor
    generation: torch.Tensor


def csit_loss(
    query_embeddings: torch.Tensor,
    passage_embeddings: torch.Tensor,
    lm_hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_labels: torch.Tensor,
    alpha: float = 0.2,
    temperature: float | torch.Tensor = 0.01,
    label_smoothing: float = 0.0,
    group_size: int | None = None,
    normalize: bool = True,
    lm_bias: torch.Tensor | None = None,
    shift_labels: bool = True,
    passage_ids: torch.Tensor | None = None,
    gather: bool = False,
    labels: torch.Tensor | None = None,
) -> CSITLossOutput:
    """CSIT loss from pooled embeddings and the decoder's hidden states.

    Args:
        query_embeddings: ``[Q, H]`` session embeddings (last summary token's final hidden state).
        passage_embeddings: ``[Q * group_size, H]`` in Tevatron order ``[pos, neg_1..neg_k]`` per query.
        lm_hidden: ``[B, L, H]`` final hidden states (after the last norm) of the packed rows.
        lm_weight: ``[V, H]`` LM head weight; lm_bias: optional ``[V]``.
        lm_labels: ``[B, L]`` response token ids, -100 elsewhere. Hugging Face convention (the position that
            predicts ``labels[t]`` is ``t - 1``) when ``shift_labels``; already aligned otherwise.
        alpha: weight of the LM loss.
        temperature, group_size, labels, passage_ids, gather: as in :func:`convret.info_nce` (``labels``: the
            index of each query's positive, for layouts with different numbers of hard negatives per query).
        label_smoothing: epsilon of the LM loss.
        normalize: L2-normalise the embeddings first (ChatRetriever does).

    Returns:
        :class:`CSITLossOutput` ``(loss, contrastive, generation)``, fp32 scalars.
    """
    if normalize:
        query_embeddings = torch.nn.functional.normalize(query_embeddings, dim=-1)
        passage_embeddings = torch.nn.functional.normalize(passage_embeddings, dim=-1)
    if query_embeddings.shape[0] > 0:
        contrastive = info_nce(query_embeddings, passage_embeddings, temperature=temperature, group_size=group_size,
                               labels=labels, passage_ids=passage_ids, gather=gather)
    else:
        contrastive = query_embeddings.new_zeros((), dtype=torch.float32)
    if shift_labels:  # shift the labels, not the hidden states: slicing those would copy all of them
        lm_labels = torch.nn.functional.pad(lm_labels[..., 1:], (0, 1), value=-100)
    generation = linear_cross_entropy(lm_hidden, lm_weight, lm_labels, bias=lm_bias, label_smoothing=label_smoothing)
    return CSITLossOutput(contrastive + alpha * generation, contrastive, generation)


class CSITLoss(torch.nn.Module):
    """One-pass CSIT step: ``CSITLoss(...)(model, batch)`` runs the decoder once over a
    :class:`convret.collate.CSITBatch` and returns :class:`CSITLossOutput`.

    ``model`` is a ``*ForCausalLM`` (or a PEFT wrapper of one) loaded with ``attn_implementation="convret"``.
    Only its decoder runs on all tokens; the LM head runs on the labelled response tokens, chunked.

    Example::

        batch = CSITCollator(summary_ids, pad_id, max_len=2048)(examples)
        out = CSITLoss(alpha=0.2, temperature=0.01, label_smoothing=0.1)(model, batch)
        out.loss.backward()
    """

    def __init__(self, alpha: float = 0.2, temperature: float = 0.01, label_smoothing: float = 0.0,
                 normalize: bool = True, gather: bool = False):
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.normalize = normalize
        self.gather = gather

    def forward(self, model: torch.nn.Module, batch: CSITBatch) -> CSITLossOutput:
        hidden = decoder_of(model)(**batch.model_inputs()).last_hidden_state
        head = model.get_output_embeddings()
        return csit_loss(
            pool_hidden(hidden, batch.query_positions),
            pool_hidden(hidden, batch.passage_positions),
            hidden, head.weight, batch.labels,
            alpha=self.alpha, temperature=self.temperature, label_smoothing=self.label_smoothing,
            group_size=None if batch.positive_indices is not None else batch.group_size or None,
            normalize=self.normalize, lm_bias=getattr(head, "bias", None), gather=self.gather,
            labels=batch.positive_indices, passage_ids=batch.passage_ids,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, label_smoothing={self.label_smoothing}"


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The base decoder (``model.model`` of a ``*ForCausalLM``) that returns hidden states, not logits; works
    through PEFT wrappers (LoRA layers are injected in place, so the decoder carries them)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise TypeError(f"cannot find the decoder of {type(model).__name__}; pass a *ForCausalLM model")
    return decoder
