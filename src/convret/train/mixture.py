"""Training on several sources with weights (ChatRetriever section 5: UltraChat + MS MARCO beats either alone).

``train_files`` lists the sources: in the YAML config ``train_files: [{path, format, weight, name, corpus}]``
(``format`` auto, ``weight`` 1, ``name`` the file's stem by default), on the command line
``--train_files a.jsonl:0.7,b.jsonl:0.3`` (``PATH[:WEIGHT[:FORMAT]]``, comma-separated).

Batches are homogeneous: every batch holds examples of one source. The contrastive loss scores each query
against every passage of its batch, and a passage of another source is an easy negative (an MS MARCO passage is
plainly not the answer to an UltraChat turn): a mixed batch would spend most of its in-batch negatives on such
passages. A per-device batch is the unit (under DDP each rank's batch is homogeneous; ranks may hold different
sources in one step).

Proportions are stratified, not drawn independently: an epoch has ``floor(sum of the sources' sizes / batch
size)`` batches, of which source ``s`` gets ``w_s / sum(w)`` (rounded by largest remainder, so each source's
count is within 1 of its share), in an order shuffled by ``(seed, epoch)``. Inside a source, examples come from
a permutation seeded by ``(seed, epoch, source)``, repeated with a new permutation when a small, heavily
weighted source runs out (oversampling). Every draw is a function of ``(seed, epoch)``: a resumed run replays
the same batches (the Trainer skips the ones already consumed).
"""
from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..data.records import TrainingExample

__all__ = ["TrainSource", "parse_train_files", "MixtureDataset", "MixtureSampler", "MixtureCollator",
           "SOURCE_COUNTS_KEY", "stratified_counts"]

# stats key of a CSITBatch: examples of the batch per source (a list, one count per source)
SOURCE_COUNTS_KEY = "source_counts"


@dataclass
class TrainSource:
    """One training source of a mixture."""

    path: str
    weight: float = 1.0
    format: str = "auto"
    name: str | None = None
    corpus: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"train_files: a source needs a path, got {self.path!r}")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValueError(f"train_files: weight of {self.path} must be a number, got {self.weight!r}") from None
        if not self.weight > 0:
            raise ValueError(f"train_files: weight of {self.path} must be positive, got {self.weight}")
        if self.name is None:
            self.name = Path(self.path).stem


def _resolve(path: str, base: Path | None) -> str:
    if path.startswith("resources:") and base is not None:
        return str(base / path.removeprefix("resources:"))
    return path


def parse_train_files(value: Any, resources: Path | None = None) -> list[TrainSource]:
    """Sources from the YAML list (mappings or ``PATH[:WEIGHT[:FORMAT]]`` strings) or the flag's
    comma-separated string. Paths starting with ``resources:`` are inside the installed package."""
    from ..data.readers import TRAINING_FORMATS

    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"train_files must be a list of {{path, weight, format}} or 'a.jsonl:0.7,b.jsonl:0.3', "
                         f"got {type(value).__name__}")
    sources = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {f.name for f in dataclasses.fields(TrainSource)}
            if unknown:
                raise ValueError(f"train_files: unknown keys {sorted(unknown)} in {item} (path, weight, format, "
                                 "name, corpus)")
            source = TrainSource(**item)
        elif isinstance(item, str):
            parts = item.split(":")
            fmt = "auto"
            if len(parts) >= 3 and parts[-1] in (*TRAINING_FORMATS, "auto") and _is_number(parts[-2]):
                fmt = parts.pop()
            weight = parts.pop() if len(parts) >= 2 and _is_number(parts[-1]) else 1.0
            source = TrainSource(":".join(parts), weight, fmt)
        else:
            raise ValueError(f"train_files: each source is a mapping or 'PATH:WEIGHT', got {item!r}")
        source.path = _resolve(source.path, resources)
        if source.corpus:
            source.corpus = _resolve(source.corpus, resources)
        sources.append(source)
    if not sources:
        raise ValueError("train_files is empty")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"train_files: source names {names} repeat; give each a name")
    return sources


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def stratified_counts(weights: Sequence[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder (each within 1 of its exact share)."""
    norm = sum(weights)
    exact = [w / norm * total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureDataset(torch.utils.data.Dataset):
    """The examples of every source, concatenated; item ``(epoch, i)`` (or ``i``: epoch 0) is ``(source index,
    example)``, the example drawn by its source's :class:`TrainingDataset` (that epoch's negatives and positive,
    seeded by ``(seed, source, epoch, index)``)."""

    def __init__(self, sources: Sequence[tuple[str, float, Sequence[TrainingExample]]]):
        self.source_names = [name for name, _, _ in sources]
        self.weights = [float(w) for _, w, _ in sources]
        self.sizes = [len(examples) for _, _, examples in sources]
        for name, size in zip(self.source_names, self.sizes):
            if size == 0:
                raise ValueError(f"training source {name!r} has no examples")
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._examples = [list(examples) for _, _, examples in sources]
        self.configure()

    def configure(self, num_negatives: int | None = None, seed: int = 0, sample: bool = True) -> None:
        """How each source's :class:`TrainingDataset` draws negatives and positives (as a single file's)."""
        from .data import TrainingDataset

        self.datasets = [TrainingDataset(examples, num_negatives=num_negatives, seed=seed * 1009 + s, sample=sample)
                         for s, examples in enumerate(self._examples)]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, TrainingExample]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (0, int(key))
        if not 0 <= index < len(self):
            raise IndexError(index)
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, self.datasets[source][(epoch, index - self.offsets[source])]

    def sampler(self, seed: int, batch_size: int) -> "MixtureSampler":
        return MixtureSampler(self.sizes, self.weights, batch_size, seed)


class MixtureSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """``(epoch, index)`` keys of a :class:`MixtureDataset` in blocks of ``batch_size`` from one source each (see
    the module docstring); a function of ``(seed, epoch)``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, seed: int):
        self.sizes, self.weights = list(sizes), list(weights)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_batches = sum(self.sizes) // self.batch_size
        if self.num_batches == 0:
            raise ValueError(f"{sum(self.sizes)} training examples make no batch of {self.batch_size}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batch_sources(self, epoch: int) -> list[int]:
        """The source of each batch of ``epoch``."""
        counts = stratified_counts(self.weights, self.num_batches)
        order = [s for s, n in enumerate(counts) for _ in range(n)]
        perm = torch.randperm(len(order), generator=self._generator(epoch, -1)).tolist()
        return [order[i] for i in perm]

    def _generator(self, epoch: int, source: int, cycle: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1009 + source + 1) * 101 + cycle)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        sources = self.batch_sources(self.epoch)
        streams: dict[int, list[int]] = {}
        needed = [sources.count(s) * self.batch_size for s in range(len(self.sizes))]
        for s, n in enumerate(needed):
            stream: list[int] = []
            cycle = 0
            while len(stream) < n:
                stream += torch.randperm(self.sizes[s], generator=self._generator(self.epoch, s, cycle)).tolist()
                cycle += 1
            streams[s] = [self.offsets[s] + i for i in stream[:n]]
        position = [0] * len(self.sizes)
        for s in sources:
            start = position[s]
            position[s] += self.batch_size
            for index in streams[s][start : start + self.batch_size]:
                yield self.epoch, index


class MixtureCollator:
    """Unpacks ``(source, example)`` items for the :class:`TrainingCollator` and records the batch's examples per
    source in ``batch.stats["source_counts"]`` (the trainer logs them)."""

    def __init__(self, collator: Any, num_sources: int):
        self.collator = collator
        self.num_sources = num_sources

    def __call__(self, items: Sequence[tuple[int, TrainingExample]]) -> dict[str, Any]:
        out = self.collator([example for _, example in items])
        counts = [0] * self.num_sources
        for source, _ in items:
            counts[source] += 1
        out["batch"].stats[SOURCE_COUNTS_KEY] = counts
        return out


def read_mixture(data_args: Any, loss_args: Any, resources: Path | None = None,
                 report: list[dict[str, Any]] | None = None) -> MixtureDataset:
    """Every source of ``data_args.train_files`` read with ``convret train``'s reader (``max_examples`` applies
    to each source; what each holds is appended to ``report``)."""
    from .examples import read_examples

    sources = []
    for source in parse_train_files(data_args.train_files, resources):
        one = dataclasses.replace(data_args, train_file=source.path, train_format=source.format,
                                  corpus=source.corpus if source.corpus is not None else data_args.corpus,
                                  train_files=None)
        if not os.path.isfile(source.path):
            raise FileNotFoundError(f"train_files: {source.path}: no such file")
        sources.append((source.name, source.weight, read_examples(one, loss_args, report)))
    return MixtureDataset(sources)
