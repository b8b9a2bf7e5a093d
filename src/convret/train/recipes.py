"""The training objectives, computed from ONE decoder pass over a packed :class:`convret.CSITBatch`.

- ``csit`` (ChatRetriever): ``L = L_C + alpha * L_S``. ``L_C``: InfoNCE of each session embedding against its
  positive, its hard negatives and every other passage of the (global) batch, false negatives masked by
  passage id; ``L_S``: the session-masked LM loss of the response given the summary tokens alone.
- ``uniconv`` (UniConv): ``L = L_R + w_G * L_G + alpha * L_CII``. ``L_R`` is ``L_C`` above, ``L_G`` is ``L_S``
  above, and ``L_CII`` (context identification) is an InfoNCE of the embedding of ``[session, gold passage]``
  against the embeddings of the responses of the batch: its own response is the positive, every other
  response a negative (docs/train.md says why).

A recipe splits into what GradCache needs: the positions to pool (:meth:`Recipe.embedding_positions`), the
contrastive terms from pooled embeddings (:meth:`Recipe.contrastive_terms`) and the LM term from a chunk of
hidden states (:meth:`Recipe.generation`); :meth:`Recipe.forward` runs them on the whole batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..collate import IGNORE_INDEX, CSITBatch
from ..ops.info_nce import TemperatureMixin
from ..csit import contrastive_loss, decoder_hidden, generation_loss, unwrap_model
from .arguments import LossArguments
from .data import NUM_CII_KEY

__all__ = ["Recipe", "RecipeOutput", "make_recipe"]


class RecipeOutput(NamedTuple):
    """``loss`` (fp32 scalar with graph) and the named terms before weighting (``contrastive``,
    ``generation``, and ``cii`` for UniConv)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class Recipe(TemperatureMixin, torch.nn.Module):
    """Base of the recipes: weights of the terms, the (optionally learnable) temperature.

    Args:
        weights: weight of each term by name.
        temperature: InfoNCE tau (initial value when learnable).
        learnable_temperature: tau is a parameter (stored as log tau); under DDP call
            :meth:`average_gradients` after each backward.
        label_smoothing: LM label smoothing.
        normalize: L2-normalise embeddings.
        gather: cross-rank negatives and global normalisation under ``torch.distributed``.
    """

    name = "base"

    def __init__(self, weights: dict[str, float], temperature: float = 0.01, learnable_temperature: bool = False,
                 label_smoothing: float = 0.0, normalize: bool = True, gather: bool = True):
        super().__init__()
        self.weights = dict(weights)
        self.label_smoothing = label_smoothing
        self.normalize = normalize
        self.gather = gather
        self._init_temperature(temperature, learnable_temperature)

    # ------------------------------------------------------------------ pieces (GradCache uses them one by one)
    def embedding_positions(self, batch: CSITBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def contrastive_terms(self, embeddings: dict[str, torch.Tensor], batch: CSITBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generation(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   num_label_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """The LM loss of ``hidden`` through the LM head ``head`` (its weight read directly: never the
        ``[tokens, vocab]`` logits).

        Under DeepSpeed ZeRO-3 a partitioned weight (it has a ``ds_id``) is an empty placeholder outside a call of
        its module, so there the loss runs as the head's forward (:func:`call_as_forward`): ZeRO-3's hooks gather
        the weight for it and again before its backward. Under FSDP2 the head's group stays unsharded from the
        model's forward to its backward (accelerate shards it with ``reshard_after_forward=False``), and a second
        call of the module in one step would upset FSDP2's per-group hook order: its weight is read as is, and a
        weight still sharded (a ``DTensor``) is refused."""
        def loss(module: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if _is_dtensor(weight):
                raise RuntimeError("the LM head's weight is still sharded (a DTensor) after the model's forward: the "
                                   "FSDP2 group holding it must not reshard after forward")
            return generation_loss(hidden, weight, labels, bias=getattr(module, "bias", None),
                                   label_smoothing=self.label_smoothing, gather=self.gather,
                                   num_label_tokens=num_label_tokens)

        if hasattr(head.weight, "ds_id"):
            return call_as_forward(head, loss, hidden, labels)
        return loss(head, hidden, labels)

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())

    def global_label_tokens(self, labels: torch.Tensor) -> int:
        """Label tokens of the whole (global) batch after the HF shift (the first position never predicts)."""
        count = (labels[..., 1:] != IGNORE_INDEX).sum().reshape(1)
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
        return int(count.item())

    # ------------------------------------------------------------------ the whole step
    def forward(self, model: torch.nn.Module, batch: CSITBatch) -> RecipeOutput:
        hidden = decoder_hidden(model, batch)
        embeddings = {name: hidden[pos[:, 0], pos[:, 1]] for name, pos in self.embedding_positions(batch).items()}
        terms = self.contrastive_terms(embeddings, batch)
        terms["generation"] = self.generation(hidden, unwrap_model(model).get_output_embeddings(), batch.labels)
        return RecipeOutput(self.combine(terms), terms)

    def _info_nce(self, queries, passages, labels=None, group_size=None, passage_ids=None):
        if self.normalize:
            queries = torch.nn.functional.normalize(queries, dim=-1)
            passages = torch.nn.functional.normalize(passages, dim=-1)
        return contrastive_loss(queries, passages, self.temperature, labels=labels, group_size=group_size,
                                passage_ids=passage_ids, gather=self.gather)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, temperature={self.temperature_value():.4g}, "
                f"learnable_temperature={self.learnable_temperature}, label_smoothing={self.label_smoothing}")


    def average_gradients(self) -> None:
        """Average the learnable temperature's gradient over ranks, as DDP does for the model's parameters.
        Call it on every rank after each backward (outside autograd: a collective inside a backward hook would
        interleave with DDP's bucket all-reduces in a different order on each rank). A rank whose batch had no
        query contributes zero."""
        if not (self.learnable_temperature and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return
        param = self.log_temperature
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()


class CSITRecipe(Recipe):
    """ChatRetriever's CSIT: ``contrastive + alpha * generation``."""

    name = "csit"

    def __init__(self, alpha: float = 0.2, **kwargs):
        super().__init__({"contrastive": 1.0, "generation": alpha}, **kwargs)

    def embedding_positions(self, batch: CSITBatch) -> dict[str, torch.Tensor]:
        return {"query": batch.query_positions, "passage": batch.passage_positions}

    def contrastive_terms(self, embeddings, batch):
        return {"contrastive": self._info_nce(
            embeddings["query"], embeddings["passage"], labels=getattr(batch, "positive_indices", None),
            group_size=batch.group_size or None, passage_ids=getattr(batch, "passage_ids", None))}


class UniConvRecipe(Recipe):
    """UniConv: ``contrastive (L_R) + generation_weight * generation (L_G) + alpha * cii (L_CII)``.

    The batch's last ``stats["num_cii"]`` queries are ``[session, gold passage, EMB]`` sequences and its last
    ``num_cii`` passages their responses ``[response, EMB]`` (one each, in the same order)."""

    name = "uniconv"

    def __init__(self, alpha: float = 0.5, generation_weight: float = 1.0, **kwargs):
        super().__init__({"contrastive": 1.0, "generation": generation_weight, "cii": alpha}, **kwargs)

    @staticmethod
    def _split(batch: CSITBatch) -> tuple[int, int, int]:
        num_cii = int(batch.stats.get(NUM_CII_KEY, 0))
        return batch.query_positions.shape[0] - num_cii, batch.passage_positions.shape[0] - num_cii, num_cii

    def embedding_positions(self, batch):
        queries, passages, _ = self._split(batch)
        return {"query": batch.query_positions[:queries], "passage": batch.passage_positions[:passages],
                "cii_query": batch.query_positions[queries:], "cii_response": batch.passage_positions[passages:]}

    def contrastive_terms(self, embeddings, batch):
        queries, passages, num_cii = self._split(batch)
        labels = getattr(batch, "positive_indices", None)
        ids = getattr(batch, "passage_ids", None)
        retrieval = self._info_nce(
            embeddings["query"], embeddings["passage"],
            labels=None if labels is None else labels[:queries],
            group_size=None if labels is not None else (batch.group_size or None),
            passage_ids=None if ids is None else ids[:passages])
        cii_labels = torch.arange(num_cii, device=batch.query_positions.device)
        cii = self._info_nce(embeddings["cii_query"], embeddings["cii_response"], labels=cii_labels,
                             passage_ids=None if ids is None else ids[passages:])
        return {"contrastive": retrieval, "cii": cii}


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def call_as_forward(module: torch.nn.Module, fn, *args):
    """``fn(module, *args)`` run as ``module(*args)``: through ``nn.Module.__call__``, so that every hook on the
    module (DeepSpeed ZeRO-3's gather / release and backward re-gather, FSDP2's unshard) wraps it."""
    module.forward = lambda *inner: fn(module, *inner)  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        del module.forward


def make_recipe(args: LossArguments) -> Recipe:
    """The recipe module of ``args.recipe`` with its (resolved) weights."""
    args = args.resolved()
    common = {"temperature": args.temperature, "learnable_temperature": args.learnable_temperature,
              "label_smoothing": args.label_smoothing, "normalize": args.normalize, "gather": args.gather}
    if args.recipe == "csit":
        return CSITRecipe(alpha=args.alpha, **common)
    return UniConvRecipe(alpha=args.alpha, generation_weight=args.generation_weight, **common)
