"""One-pass CSIT collator: every sequence of a training step packed into the rows of ONE forward pass.

A CSIT step (ChatRetriever, Mao et al., ACL 2024 Findings) needs, per training example,

- the session ``[x_1..x_N, EMB_1..EMB_t]`` to embed (the query),
- its positive and hard-negative passages ``[p_1..p_K, EMB_1..EMB_t]`` to embed,
- the LM sequence ``[x_1..x_N, EMB_1..EMB_t, y_1..y_M, EMB_1..EMB_t]`` whose response learns to be
  generated from the summary tokens alone.

The reference implementation runs four forward passes (sessions, positives, negatives, LM sequences) over
padded batches. :class:`CSITCollator` packs all of them, first-fit decreasing, into rows of at most
``max_len`` tokens and describes the result with one :class:`SessionLayout`, so one forward pass with
``attn_implementation="convret"`` computes everything, with no attention across samples and none from a
response to its session.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence  # noqa: F401

import torch

from .data.records import CSITExample  # defined with the other records: data never imports collate
from .layout import SessionLayout

IGNORE_INDEX = -100

__all__ = ["CSITBatch", "CSITCollator", "CSITExample", "pool_hidden", "stable_passage_id", "NEGATIVE_MODES"]

#: how :class:`CSITCollator` lays out examples with different numbers of hard negatives
NEGATIVE_MODES = ("flat", "resample", "error")


@dataclass
class CSITBatch:
    """The packed batch. ``[B, L]`` tensors plus where each embedding is read.

    Attributes:
        input_ids, position_ids: LongTensor ``[B, L]``.
        labels: LongTensor ``[B, L]``, Hugging Face convention (unshifted; the model shifts): the token id on
            response tokens ``y_1..y_M`` of LM samples, -100 everywhere else.
        layout: the :class:`SessionLayout` of the rows.
        query_positions: LongTensor ``[Q, 2]`` (row, position of the last summary token), one per retrieval
            example, in example order.
        passage_positions: LongTensor ``[P, 2]``: per query, in query order, ``[pos, neg_1..neg_k]`` (k may
            differ between queries in the flat layout).
        group_size: ``1 + k`` when every query has the same k (the Tevatron grouped layout, ``P = Q * (1 + k)``);
            0 when the counts differ or the batch has no retrieval example.
        num_lm_samples: LM sequences in the batch.
        stats: packing statistics (rows, seq_len, real_tokens, fill, lm_tokens) for logging.
        passage_ids: LongTensor ``[P]`` of stable 63-bit ids (:func:`stable_passage_id`: equal on every rank
            and in every process for equal string ids), or ``None`` when no example carries ``passage_ids``.
        positive_indices: LongTensor ``[Q]``: index into the passages of each query's positive, the
            ``labels`` of :func:`convret.info_nce` (``arange(Q) * group_size`` in the grouped layout).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    layout: SessionLayout
    query_positions: torch.Tensor
    passage_positions: torch.Tensor
    group_size: int
    num_lm_samples: int
    stats: dict[str, float] = field(default_factory=dict)
    passage_ids: torch.Tensor | None = None
    positive_indices: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return int(self.query_positions.shape[0])

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(**batch.model_inputs())`` / ``model.model(...)``."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "session_layout": self.layout,
            "use_cache": False,
        }

    def to(self, device: torch.device | str) -> "CSITBatch":
        return CSITBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device), self.layout.to(device),
            self.query_positions.to(device), self.passage_positions.to(device), self.group_size,
            self.num_lm_samples, dict(self.stats),
            None if self.passage_ids is None else self.passage_ids.to(device),
            None if self.positive_indices is None else self.positive_indices.to(device),
        )


def pool_hidden(hidden: torch.Tensor, positions: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Embeddings ``[N, H]`` read from ``hidden [B, L, H]`` at ``positions [N, 2]`` (row, position);
    L2-normalised when ``normalize``."""
    emb = hidden[positions[:, 0], positions[:, 1]]
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


@dataclass
class _Sample:
    tokens: list[int]
    segment: tuple[int, int, int]
    role: str  # "query", "passage" or "lm"
    index: int  # query index, passage index (Tevatron order) or LM index
    response_len: int = 0  # y_1..y_M of an LM sample (its segment's response part also holds t summary tokens)
    query_index: int = -1  # an LM sample that also provides the query embedding (query_from_lm_sample)


class CSITCollator:
    """Builds a :class:`CSITBatch` from :class:`CSITExample` (or dicts with the same keys).

    Args:
        summary_token_ids: the t summary tokens ``EMB_1..EMB_t`` (t >= 1).
        pad_token_id: id written on padding positions.
        max_len: row length budget; every sample must fit in one row.
        max_session_len, max_passage_len, max_response_len: truncation (sessions keep their last tokens, the
            most recent turns; passages and responses keep their first tokens). ``None``: no truncation.
        pad_to_multiple_of: round the batch's row length up (tile-friendly shapes); never beyond ``max_len``.
        summary_on_passages: append the summary tokens to passages too and pool there (ChatRetriever), or
            pool passages at their last token.
        query_from_lm_sample: for an example that is both retrieval and LM, read the query embedding from the
            LM sequence's first summary block instead of packing the session a second time. Exact (the
            summary tokens only see the session in both) and saves one session per example; off by default to
            keep the reference's data flow.
        negatives: examples with different numbers of hard negatives. ``"flat"`` (default): each query keeps
            all of its own (ChatRetriever samples up to 4 and uses all when fewer exist); passages are laid out
            query after query and ``positive_indices`` says where each positive is. ``"resample"``: the grouped
            Tevatron layout with ``num_negatives`` per query (default: the most in the batch); a query with
            fewer draws extra ones from its own negatives with replacement (seeded by ``seed``: the same batch
            always gives the same layout), one with more keeps its first ``num_negatives``; a query with none
            is an error. ``"error"``: every query must have exactly ``num_negatives`` (default: as many as the
            first), else ``ValueError``. Fixed-size groups are what ``gather=True`` across ranks needs.
        num_negatives: the group's hard-negative count for ``"resample"`` / ``"error"``.
        separator_token_id: ChatRetriever-compatible sequences: its released code puts a separator token
            between the session and the summary tokens, inside the span the response can see. When given, this
            token is placed first in every summary block (``[SEP, EMB_1..EMB_t]``), for queries, passages and LM
            samples alike, so the response attends to it as in the released code.
        seed: seed of the ``"resample"`` draws.

    Passage ids: when some example carries ``passage_ids``, ``batch.passage_ids`` holds
    :func:`stable_passage_id` of each; passages of examples without ids get an id hashed from their token ids
    (equal content, equal id). Equal ids of a query's positive elsewhere in the batch are masked out of its
    negatives by :func:`convret.info_nce`.
    """

    def __init__(
        self,
        summary_token_ids: Sequence[int],
        pad_token_id: int,
        max_len: int,
        max_session_len: int | None = None,
        max_passage_len: int | None = None,
        max_response_len: int | None = None,
        pad_to_multiple_of: int = 16,
        summary_on_passages: bool = True,
        query_from_lm_sample: bool = False,
        negatives: str = "flat",
        num_negatives: int | None = None,
        separator_token_id: int | None = None,
        seed: int = 0,
    ):
        if len(summary_token_ids) == 0:
            raise ValueError("summary_token_ids must hold at least one token (t >= 1)")
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if max_len <= 0 or pad_to_multiple_of <= 0:
            raise ValueError("max_len and pad_to_multiple_of must be positive")
        self.summary_token_ids = [int(t) for t in summary_token_ids]
        if separator_token_id is not None:
            self.summary_token_ids = [int(separator_token_id)] + self.summary_token_ids
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.seed = int(seed)
        self.pad_token_id = int(pad_token_id)
        self.max_len = int(max_len)
        self.max_session_len = max_session_len
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.summary_on_passages = summary_on_passages
        self.query_from_lm_sample = query_from_lm_sample

    def __call__(self, examples: Sequence[CSITExample | Mapping[str, Any]]) -> CSITBatch:
        examples = [_as_example(e) for e in examples]
        if not examples:
            raise ValueError("empty batch: no examples")
        for i, ex in enumerate(examples):
            if ex.positive is None and ex.response is None:
                raise ValueError(f"example {i} has neither a positive nor a response: nothing to train on (a "
                                 "session to embed alone is encoding's job, not the training collator's)")
            if ex.positive is None and len(ex.negatives):
                raise ValueError(f"example {i} has hard negatives but no positive")
        examples = self._fix_negatives(examples)
        samples, group_size, positive_indices, passage_keys = self._samples(examples)
        rows = _first_fit_decreasing(samples, self.max_len)
        used = max(sum(len(s.tokens) for s in row) for row in rows)
        seq_len = min(self.max_len, -(-used // self.pad_to_multiple_of) * self.pad_to_multiple_of)

        batch = len(rows)
        input_ids = torch.full((batch, seq_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
        num_queries = sum(1 for s in samples if s.role == "query" or s.query_index >= 0)
        num_passages = sum(1 for s in samples if s.role == "passage")
        query_positions = torch.empty(num_queries, 2, dtype=torch.long)
        passage_positions = torch.empty(num_passages, 2, dtype=torch.long)
        segments = []
        for b, row in enumerate(rows):
            pos = 0
            segments.append([s.segment for s in row])
            for s in row:
                input_ids[b, pos : pos + len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
                prefix_len, summary_len, _ = s.segment
                pooled_at = pos + prefix_len + summary_len - 1
                if s.role == "query":
                    query_positions[s.index] = torch.tensor([b, pooled_at])
                elif s.role == "passage":
                    passage_positions[s.index] = torch.tensor([b, pooled_at])
                else:
                    if s.query_index >= 0:
                        query_positions[s.query_index] = torch.tensor([b, pooled_at])
                    response_start = pos + prefix_len + summary_len
                    labels[b, response_start : response_start + s.response_len] = input_ids[
                        b, response_start : response_start + s.response_len]
                pos += len(s.tokens)
        layout = SessionLayout.from_segments(segments, seq_len)
        real_tokens = sum(len(s.tokens) for s in samples)
        stats = {"rows": batch, "seq_len": seq_len, "real_tokens": real_tokens,
                 "fill": real_tokens / (batch * seq_len), "lm_tokens": int((labels != IGNORE_INDEX).sum())}
        passage_ids = None
        if any(ex.passage_ids is not None for ex in examples if ex.positive is not None):
            passage_ids = torch.tensor([stable_passage_id(key) for key in passage_keys], dtype=torch.long)
        return CSITBatch(input_ids, layout.position_ids().clone(), labels, layout, query_positions,
                         passage_positions, group_size, sum(1 for s in samples if s.role == "lm"), stats,
                         passage_ids, torch.tensor(positive_indices, dtype=torch.long))

    # ------------------------------------------------------------------ negatives
    def _fix_negatives(self, examples: list[CSITExample]) -> list[CSITExample]:
        retrieval = [(i, ex) for i, ex in enumerate(examples) if ex.positive is not None]
        for i, ex in retrieval:
            if ex.passage_ids is not None and len(ex.passage_ids) != 1 + len(ex.negatives):
                raise ValueError(f"example {i}: {len(ex.passage_ids)} passage_ids for 1 positive + "
                                 f"{len(ex.negatives)} negatives")
        if self.negatives == "flat" or not retrieval:
            return examples
        counts = [len(ex.negatives) for _, ex in retrieval]
        if self.negatives == "error":
            k = self.num_negatives if self.num_negatives is not None else counts[0]
            for (i, _), count in zip(retrieval, counts):
                if count != k:
                    raise ValueError(f"example {i} has {count} hard negatives, the grouped layout needs the same "
                                     f"number per query ({k}); use negatives='flat' or 'resample'")
            return examples
        k = self.num_negatives if self.num_negatives is not None else max(counts)
        rng = random.Random(self.seed)
        out = list(examples)
        for (i, ex), count in zip(retrieval, counts):
            if count == k:
                continue
            if count == 0:
                raise ValueError(f"example {i} has no hard negative to resample from (negatives='resample' needs "
                                 f"{k} per query); use negatives='flat'")
            order = list(range(min(count, k))) + [rng.randrange(count) for _ in range(k - count)]
            ids = None
            if ex.passage_ids is not None:
                ids = [ex.passage_ids[0]] + [ex.passage_ids[1 + j] for j in order]
            out[i] = CSITExample(ex.session, ex.positive, [ex.negatives[j] for j in order], ex.response, ids)
        return out

    # ------------------------------------------------------------------ samples
    def _samples(self, examples: list[CSITExample]) -> tuple[list[_Sample], int, list[int], list[str]]:
        summary = self.summary_token_ids
        t = len(summary)
        samples: list[_Sample] = []
        group_sizes = set()
        positive_indices: list[int] = []
        passage_keys: list[str] = []
        num_queries = num_passages = num_lm = 0
        for i, ex in enumerate(examples):
            session = _keep_last(list(ex.session), self.max_session_len)
            if not session:
                raise ValueError(f"example {i}: empty session")
            is_retrieval = ex.positive is not None
            shared_query = is_retrieval and ex.response is not None and self.query_from_lm_sample
            if is_retrieval:
                group = [ex.positive, *ex.negatives]
                group_sizes.add(len(group))
                positive_indices.append(num_passages)
                for j, passage in enumerate(group):
                    if ex.passage_ids is not None:
                        passage_keys.append(str(ex.passage_ids[j]))
                    else:
                        passage_keys.append("\x00tokens:" + ",".join(map(str, passage)))  # never a real id
                if not shared_query:
                    samples.append(_Sample(session + summary, (len(session), t, 0), "query", num_queries))
                for passage in group:
                    tokens = _keep_first(list(passage), self.max_passage_len)
                    if not tokens:
                        raise ValueError(f"example {i}: empty passage")
                    if self.summary_on_passages:
                        samples.append(_Sample(tokens + summary, (len(tokens), t, 0), "passage", num_passages))
                    else:
                        samples.append(_Sample(tokens, (len(tokens), 0, 0), "passage", num_passages))
                    num_passages += 1
            if ex.response is not None:
                response = _keep_first(list(ex.response), self.max_response_len)
                if not response:
                    raise ValueError(f"example {i}: empty response")
                tokens = session + summary + response + summary
                samples.append(_Sample(tokens, (len(session), t, len(response) + t), "lm", num_lm, len(response),
                                       num_queries if shared_query else -1))
                num_lm += 1
            if is_retrieval:
                num_queries += 1
        for s in samples:
            if len(s.tokens) > self.max_len:
                raise ValueError(f"a {s.role} sample of {len(s.tokens)} tokens does not fit max_len={self.max_len}")
        group_size = group_sizes.pop() if len(group_sizes) == 1 else 0
        return samples, group_size, positive_indices, passage_keys


def stable_passage_id(passage_id: Hashable) -> int:
    """A 63-bit non-negative integer for a passage id: the same in every process, on every rank and in every
    Python run (``hash()`` of a string is salted per process; this is BLAKE2b of ``str(passage_id)``)."""
    digest = hashlib.blake2b(str(passage_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _first_fit_decreasing(samples: list[_Sample], max_len: int) -> list[list[_Sample]]:
    rows: list[list[_Sample]] = []
    free: list[int] = []
    for s in sorted(samples, key=lambda s: len(s.tokens), reverse=True):
        for r, room in enumerate(free):
            if len(s.tokens) <= room:
                rows[r].append(s)
                free[r] -= len(s.tokens)
                break
        else:
            rows.append([s])
            free.append(max_len - len(s.tokens))
    return rows


def _keep_last(tokens: list[int], limit: int | None) -> list[int]:
    return tokens if limit is None or len(tokens) <= limit else tokens[len(tokens) - limit :]


def _keep_first(tokens: list[int], limit: int | None) -> list[int]:
    return tokens if limit is None else tokens[:limit]


def _as_example(example: CSITExample | Mapping[str, Any]) -> CSITExample:
    if isinstance(example, CSITExample):
        return example
    if isinstance(example, Mapping):
        return CSITExample(
            session=example["session"], positive=example.get("positive"),
            negatives=example.get("negatives", ()) or (), response=example.get("response"),
            passage_ids=example.get("passage_ids"),
        )
    raise TypeError(f"examples must be CSITExample or mappings, got {type(example).__name__}")
