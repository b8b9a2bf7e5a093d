"""The CSIT objective (ChatRetriever, Mao et al., ACL 2024 Findings): ``L = L_C + alpha * L_S``.

- ``L_C``: InfoNCE of each session embedding against its positive, hard negatives and all other in-batch
  passages (:func:`convret.info_nce`, tau = 0.01 on L2-normalised embeddings);
- ``L_S``: the session-masked LM loss on the responses (:func:`convret.linear_cross_entropy`, never
  materialising full-vocabulary logits; ChatRetriever's released code smooths labels with 0.1).

``alpha`` defaults to 0.2 as in the released code (the paper reports 0.3).

Under ``torch.distributed`` (``gather=True``) both parts are normalised globally: the contrastive part by the
global number of queries (every rank's queries are scored against every rank's passages), the LM part by the
global number of label tokens, each scaled by the world size so that DDP's gradient averaging gives exactly
the single-process gradient of the concatenated global batch. Ranks may hold different numbers of queries,
passages and label tokens, none at all included: every rank enters the same collectives in every step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .collate import IGNORE_INDEX, CSITBatch, pool_hidden
from .ops.info_nce.gather import _GatherWithGradient
from .ops.info_nce import TemperatureMixin, info_nce
from .ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["CSITLoss", "CSITLossOutput", "csit_loss", "contrastive_loss", "generation_loss", "decoder_of",
           "decoder_hidden"]


class CSITLossOutput(NamedTuple):
    """``loss = contrastive + alpha * generation``, fp32 scalars. The parts keep their graph: detach them (or
    call ``.item()``) for logging."""

    loss: torch.Tensor
    contrastive: torch.Tensor
    generation: torch.Tensor


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def contrastive_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float | torch.Tensor = 0.01,
    labels: torch.Tensor | None = None,
    group_size: int | None = None,
    passage_ids: torch.Tensor | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE for any batch composition, also none: queries ``[Q, D]`` against passages ``[P, D]``.

    Args:
        labels: ``[Q]`` local index of each query's positive; default ``arange(Q) * group_size`` (Tevatron
            layout, ``group_size = P // Q`` when not given).
        gather: score the local queries against the passages of every rank. Ranks may hold different Q and P
            (passages are padded to the largest P for the all-gather, the padding is dropped before scoring).
            The result is ``world_size / Q_global`` times the sum of this rank's query losses, so the mean over
            ranks is the global mean and DDP's averaging yields the global-batch gradient. A rank with no query
            still takes part in every collective (and in the backward all-reduce of the gathered passages).

    Returns:
        An fp32 scalar; 0 (connected to the inputs' graph) when there is nothing to contrast.
    """
    num_queries, num_passages = queries.shape[0], passages.shape[0]
    if labels is None and num_queries > 0:
        group = group_size or (num_passages // num_queries if num_passages % num_queries == 0 else 0)
        if group <= 0:
            raise ValueError(f"cannot infer the positives of {num_queries} queries among {num_passages} passages: "
                             "pass labels or group_size")
        labels = torch.arange(num_queries, device=queries.device) * group
    zero = (queries.sum() + passages.sum()) * 0.0
    nonfinite = ~torch.isfinite(zero.detach())  # a NaN / inf embedding: the loss is NaN (the trainer stops)
    world_size, rank = _world()
    if not gather or world_size == 1:
        if num_queries == 0 or num_passages == 0 or bool(nonfinite):
            return zero.float()
        return info_nce(queries, passages, temperature, labels=labels, passage_ids=passage_ids)

    sizes = torch.stack([torch.tensor(num_queries, device=queries.device), torch.tensor(num_passages,
                         device=queries.device), nonfinite.long(),
                         torch.tensor(int(passage_ids is not None), device=queries.device)]).long()
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = torch.stack(all_sizes).cpu()
    global_queries, max_passages = int(all_sizes[:, 0].sum()), int(all_sizes[:, 1].max())
    if bool(all_sizes[:, 2].any()):
        return zero.float() + float("nan")  # every rank returns NaN, no further collective anywhere
    if global_queries == 0 or max_passages == 0:
        return zero.float()  # the same on every rank: no further collective anywhere
    dim = passages.shape[1]
    padded = passages.new_zeros(max_passages, dim) if num_passages < max_passages else passages
    if num_passages < max_passages:
        padded = torch.cat([passages, padded[num_passages:]])
    gathered = _GatherWithGradient.apply(padded)
    keep = torch.cat([torch.arange(int(n), device=queries.device) + r * max_passages
                      for r, n in enumerate(all_sizes[:, 1].tolist())])
    global_passages = gathered.index_select(0, keep)
    global_ids = None
    if bool(all_sizes[:, 3].any()):  # decided from the gathered flags: every rank joins the id all-gather
        ids = torch.zeros(max_passages, dtype=torch.long, device=queries.device)
        if passage_ids is not None:
            ids[:num_passages] = passage_ids
        else:  # passages without ids: negative ids, unique over ranks, never equal to a real (63-bit) id
            ids[:num_passages] = -1 - (torch.arange(num_passages, device=queries.device) + rank * max_passages)
        id_list = [torch.empty_like(ids) for _ in range(world_size)]
        dist.all_gather(id_list, ids)
        global_ids = torch.cat(id_list).index_select(0, keep)
    if num_queries == 0:
        return (gathered.sum() * 0.0 + zero).float()  # joins the backward all-reduce with zero gradients
    offset = int(all_sizes[:rank, 1].sum())
    total = info_nce(queries, global_passages, temperature, labels=labels + offset, passage_ids=global_ids,
                     reduction="sum")
    return total * (world_size / global_queries)


def generation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    shift_labels: bool = True,
    gather: bool = False,
    num_label_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Session-masked LM loss over the labelled tokens, normalised by the (global, with ``gather``) number of
    label tokens, or by ``num_label_tokens`` when given (GradCache passes the full batch's count for a chunk).
    With ``gather`` the result is scaled by the world size (see :func:`contrastive_loss`)."""
    if shift_labels:  # shift the labels, not the hidden states: slicing those would copy all of them
        labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    total = linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=label_smoothing,
                                 reduction="sum")
    world_size, _ = _world()
    scale = 1.0
    if gather and world_size > 1:
        scale = float(world_size)
        if num_label_tokens is None:
            count = (labels != IGNORE_INDEX).sum().reshape(1)
            dist.all_reduce(count)
            num_label_tokens = count
    elif num_label_tokens is None:
        num_label_tokens = (labels != IGNORE_INDEX).sum()
    count = float(num_label_tokens.item() if isinstance(num_label_tokens, torch.Tensor) else num_label_tokens)
    return total * (scale / max(count, 1.0))


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
        query_embeddings: ``[Q, H]`` session embeddings (last summary token's final hidden state); ``Q`` may be 0.
        passage_embeddings: ``[P, H]``: Tevatron order ``[pos, neg_1..neg_k]`` per query (``P = Q * group_size``),
            or any order with ``labels``.
        lm_hidden: ``[B, L, H]`` final hidden states (after the last norm) of the packed rows.
        lm_weight: ``[V, H]`` LM head weight; lm_bias: optional ``[V]``.
        lm_labels: ``[B, L]`` response token ids, -100 elsewhere. Hugging Face convention (the position that
            predicts ``labels[t]`` is ``t - 1``) when ``shift_labels``; already aligned otherwise.
        alpha: weight of the LM loss.
        temperature, group_size, passage_ids: as in :func:`convret.info_nce`.
        labels: ``[Q]`` index of each query's positive among the (local) passages (flat layout).
        gather: cross-rank negatives and global normalisation (:func:`contrastive_loss`, :func:`generation_loss`).
        label_smoothing: epsilon of the LM loss.
        normalize: L2-normalise the embeddings first (ChatRetriever does).

    Returns:
        :class:`CSITLossOutput` ``(loss, contrastive, generation)``, fp32 scalars.
    """
    if normalize:
        query_embeddings = torch.nn.functional.normalize(query_embeddings, dim=-1)
        passage_embeddings = torch.nn.functional.normalize(passage_embeddings, dim=-1)
    contrastive = contrastive_loss(query_embeddings, passage_embeddings, temperature, labels=labels,
                                   group_size=group_size, passage_ids=passage_ids, gather=gather)
    generation = generation_loss(lm_hidden, lm_weight, lm_labels, bias=lm_bias, label_smoothing=label_smoothing,
                                 shift_labels=shift_labels, gather=gather)
    return CSITLossOutput(contrastive + alpha * generation, contrastive, generation)


class CSITLoss(TemperatureMixin, torch.nn.Module):
    """One-pass CSIT step: ``CSITLoss(...)(model, batch)`` runs the decoder once over a
    :class:`convret.collate.CSITBatch` and returns :class:`CSITLossOutput`.

    ``model`` is a ``*ForCausalLM`` (or a PEFT wrapper of one, or a DDP wrapper of either) loaded with
    ``attn_implementation="convret"``. Only its decoder runs on all tokens; the LM head runs on the labelled
    response tokens, chunked.

    Args:
        alpha: weight of the LM loss.
        temperature: InfoNCE temperature (the initial one when learnable).
        label_smoothing: epsilon of the LM loss.
        normalize: L2-normalise embeddings.
        gather: cross-rank negatives and global normalisation under ``torch.distributed``.
        learnable_temperature: make the temperature a parameter of this module, stored as ``log(tau)`` so that
            it stays positive (add ``loss.parameters()`` to the optimizer).

    Example::

        batch = CSITCollator(summary_ids, pad_id, max_len=2048)(examples)
        out = CSITLoss(alpha=0.2, temperature=0.01, label_smoothing=0.1)(model, batch)
        out.loss.backward()
    """

    def __init__(self, alpha: float = 0.2, temperature: float = 0.01, label_smoothing: float = 0.0,
                 normalize: bool = True, gather: bool = False, learnable_temperature: bool = False):
        super().__init__()
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.normalize = normalize
        self.gather = gather
        self._init_temperature(temperature, learnable_temperature)

    def forward(self, model: torch.nn.Module, batch: CSITBatch) -> CSITLossOutput:
        hidden = decoder_hidden(model, batch)
        head = unwrap_model(model).get_output_embeddings()
        return self.loss_from_hidden(hidden, head, batch)

    def loss_from_hidden(self, hidden: torch.Tensor, head: torch.nn.Module, batch: CSITBatch) -> CSITLossOutput:
        return csit_loss(
            pool_hidden(hidden, batch.query_positions),
            pool_hidden(hidden, batch.passage_positions),
            hidden, head.weight, batch.labels,
            alpha=self.alpha, temperature=self.temperature, label_smoothing=self.label_smoothing,
            group_size=batch.group_size or None, normalize=self.normalize,
            lm_bias=getattr(head, "bias", None), gather=self.gather,
            passage_ids=getattr(batch, "passage_ids", None), labels=getattr(batch, "positive_indices", None),
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature_value():.4g}, "
                f"learnable_temperature={self.learnable_temperature}, label_smoothing={self.label_smoothing}, "
                f"gather={self.gather}")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / ``torch.compile`` wrappers (a PEFT wrapper is kept)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The base decoder (``model.model`` of a ``*ForCausalLM``) that returns hidden states, not logits; works
    through PEFT wrappers (LoRA layers are injected in place, so the decoder carries them)."""
    model = unwrap_model(model)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise TypeError(f"cannot find the decoder of {type(model).__name__}; pass a *ForCausalLM model")
    return decoder


def _is_fsdp2(model: torch.nn.Module) -> bool:
    """An FSDP2 (``fully_shard``) root: its forward hooks gather the parameters, so it must be called itself."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def decoder_hidden(model: torch.nn.Module, batch: CSITBatch) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of the packed rows.

    A bare model (or PEFT wrapper) runs its decoder alone. A wrapped one (DDP) must be called through its own
    ``forward`` (DDP prepares its gradient reduction there): the whole ``*ForCausalLM`` runs with
    ``logits_to_keep`` empty, so the LM head computes no logits, and a hook on the decoder returns its output."""
    inner = unwrap_model(model)
    if inner is model and not _is_fsdp2(model):
        return decoder_of(model)(**batch.model_inputs()).last_hidden_state
    captured: list[torch.Tensor] = []
    handle = decoder_of(inner).register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(**batch.model_inputs(), logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch.input_ids.device))
    finally:
        handle.remove()
    return captured[-1]
