"""From training records to one-pass batches: the dataset, a sampler whose shuffle is a function of
(seed, epoch) (so a resumed run replays it), and the data collator of the Trainer."""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch

from ..collate import CSITCollator, CSITExample
from ..data.records import TrainingExample

__all__ = ["TrainingDataset", "EpochShuffleSampler", "TrainingCollator", "NUM_CII_KEY"]

# stats key of a CSITBatch: the last NUM_CII queries and passages are UniConv's context-identification pairs
NUM_CII_KEY = "num_cii"


class TrainingDataset(torch.utils.data.Dataset):
    """The training examples, held in memory (records are text; tokenisation happens in the collator)."""

    def __init__(self, examples: Sequence[TrainingExample]):
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("no training examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TrainingExample:
        return self.examples[index]


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``.

    The Trainer calls :meth:`set_epoch` at the start of every epoch; a resumed run therefore draws the same
    order as the uninterrupted one and skips the batches already consumed (``ignore_data_skip=False``). The
    global RNG is never touched, so dropout draws are not shifted by the data order either."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_examples, generator=generator).tolist())


class TrainingCollator:
    """``TrainingExample`` list -> ``{"batch": CSITBatch}`` through a sequence formatter and a
    :class:`CSITCollator`.

    Args:
        formatter: a :class:`convret.data.SequenceFormatter` (anything with ``.example(ex) -> CSITExample``,
            ``.session_with_passages(history, query, passages)``, ``.passage(passage)``).
        collator: the :class:`CSITCollator` that packs the sequences.
        recipe: ``"csit"``: each example gives a query, its positive and hard negatives, and an LM sequence.
            ``"uniconv"``: the same, plus one context-identification pair per example with a positive and a
            response: the query ``[session, gold passage, EMB]`` and the response ``[response, EMB]`` as its
            "passage", packed into the same batch after the retrieval sequences (``batch.stats["num_cii"]``
            says how many).
        num_negatives: keep at most this many hard negatives per example (the first ones).
        seed: seed of the negative subsampling when an example has more than ``num_negatives``: the first
            ``num_negatives`` are kept (deterministic, so resume is exact).
    """

    def __init__(self, formatter: Any, collator: CSITCollator, recipe: str = "csit", num_negatives: int = 4):
        if recipe not in ("csit", "uniconv"):
            raise ValueError(f"unknown recipe {recipe!r}")
        self.formatter = formatter
        self.collator = collator
        self.recipe = recipe
        self.num_negatives = num_negatives

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        trimmed = [_trim(ex, self.num_negatives) for ex in examples]
        sequences: list[CSITExample] = [self.formatter.example(ex) for ex in trimmed]
        num_cii = 0
        if self.recipe == "uniconv":
            for ex in trimmed:
                if ex.positive is None or ex.response is None:
                    continue
                # the gold passage answers the session as an assistant message (no second BOS, no instruction)
                context = list(self.formatter.session_with_passages(ex.history, ex.query, [ex.positive]))
                response = self.formatter.passage(ex.response)
                cii = CSITExample(session=context, positive=response)
                if hasattr(cii, "passage_ids"):
                    cii.passage_ids = [f"{ex.id}\x00response"]
                sequences.append(cii)
                num_cii += 1
        batch = self.collator(sequences)
        batch.stats[NUM_CII_KEY] = num_cii
        return {"batch": batch}


def _trim(example: TrainingExample, num_negatives: int) -> TrainingExample:
    if len(example.negatives) <= num_negatives:
        return example
    return TrainingExample(example.id, example.history, example.query, example.positive,
                           list(example.negatives[:num_negatives]), example.response, example.rewrite)


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
