"""From training records to one-pass batches: the dataset (hard negatives and the positive sampled per epoch), a
sampler whose shuffle is a function of (seed, epoch) (so a resumed run replays it), and the data collator of the
Trainer."""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterator, Sequence

import torch

from ..collate import CSITCollator, CSITExample
from ..data.records import TrainingExample

__all__ = ["TrainingDataset", "EpochShuffleSampler", "TrainingCollator", "NUM_CII_KEY"]

# stats key of a CSITBatch: the last NUM_CII queries and passages are UniConv's context-identification pairs
NUM_CII_KEY = "num_cii"


class TrainingDataset(torch.utils.data.Dataset):
    """The training examples, held in memory (records are text; tokenisation happens in the collator).

    Items are looked up by ``(epoch, index)`` (what :class:`EpochShuffleSampler` yields) or by a plain
    ``index`` (epoch 0). Each lookup draws, from a generator seeded by ``(seed, epoch, index)`` alone:

    - ``num_negatives`` of the example's hard negatives, without replacement, when it has more (ChatRetriever
      samples its negatives at random; every negative of the data is seen over the epochs). With fewer, all
      are kept.
    - one of its gold passages when it has several (``TrainingExample.positives``, Tevatron's
      ``positive_passages``), as Tevatron does.

    A resumed run therefore draws exactly what the uninterrupted one drew, in any process and on any rank.
    ``sample=False`` (or ``num_negatives=None``) keeps the first ``num_negatives`` and the first positive.
    """

    def __init__(self, examples: Sequence[TrainingExample], num_negatives: int | None = None, seed: int = 0,
                 sample: bool = True):
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("no training examples")
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.num_negatives = num_negatives
        self.seed = int(seed)
        self.sample = sample

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> TrainingExample:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (0, int(key))
        return self.draw(index, epoch)

    def draw(self, index: int, epoch: int = 0) -> TrainingExample:
        """Example ``index`` with the negatives and the positive of ``epoch``."""
        example = self.examples[index]
        negatives, positive = list(example.negatives), example.positive
        if not self.sample or self.num_negatives is None:
            if self.num_negatives is None or len(negatives) <= self.num_negatives:
                return example
            return dataclasses.replace(example, negatives=negatives[: self.num_negatives])
        rng = random.Random(f"convret-train-sample:{self.seed}:{epoch}:{index}")  # str seeds hash with SHA-512
        if len(example.positives) > 1:
            positive = rng.choice(example.positives)
        if len(negatives) > self.num_negatives:
            negatives = rng.sample(negatives, self.num_negatives)
        if positive is example.positive and negatives == example.negatives:
            return example
        return dataclasses.replace(example, positive=positive, negatives=negatives)


class EpochShuffleSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``; yields ``(epoch, index)`` so that
    :class:`TrainingDataset` draws that epoch's negatives (also in dataloader workers, which never see
    :meth:`set_epoch`). ``shuffle=False``: indices in order (``--train_sampling_strategy sequential``).

    The Trainer calls :meth:`set_epoch` at the start of every epoch; a resumed run therefore draws the same
    order as the uninterrupted one and skips the batches already consumed (``ignore_data_skip=False``). The
    global RNG is never touched, so dropout draws are not shifted by the data order either."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            return iter([(self.epoch, i) for i in range(self.num_examples)])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter([(self.epoch, i) for i in torch.randperm(self.num_examples, generator=generator).tolist()])


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
        num_negatives: keep at most this many hard negatives per example (the first ones of what it is given:
            :class:`TrainingDataset` has already sampled them for the epoch, seeded by (seed, epoch, index)).
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
    return dataclasses.replace(example, negatives=list(example.negatives[:num_negatives]))


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
