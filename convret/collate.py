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

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .layout import SessionLayout

IGNORE_INDEX = -100

__all__ = ["CSITBatch", "CSITCollator", "CSITExample", "pool_hidden"]


@dataclass
class CSITExample:
    """One training example, already tokenised (ids, no special summary tokens).

    ``positive`` / ``negatives`` make it a retrieval example (its session is embedded as a query);
    ``response`` makes it an LM example. An example may be both, or either."""

    session: Sequence[int]
    positive: Sequence[int] | None = None
    negatives: Sequence[Sequence[int]] = ()
    response: Sequence[int] | None = None


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
        passage_positions: LongTensor ``[Q * group_size, 2]``, Tevatron order ``[pos, neg_1..neg_k]`` per query.
        group_size: ``1 + k`` passages per query (0 when the batch has no retrieval example).
        num_lm_samples: LM sequences in the batch.
        stats: packing statistics (rows, seq_len, real_tokens, fill, lm_tokens) for logging.
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
        summary_token_ids: the t summary tokens ``EMB_1..EMB_t`` (t >= 1). ChatRetriever-compatible variant:
            include the separator token as the first id.
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
    ):
        if len(summary_token_ids) == 0:
            raise ValueError("summary_token_ids must hold at least one token (t >= 1)")
        if max_len <= 0 or pad_to_multiple_of <= 0:
            raise ValueError("max_len and pad_to_multiple_of must be positive")
        self.summary_token_ids = [int(t) for t in summary_token_ids]
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
            raise ValueError("empty batch")
        samples, group_size = self._samples(examples)
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
        return CSITBatch(input_ids, layout.position_ids().clone(), labels, layout, query_positions,
                         passage_positions, group_size, sum(1 for s in samples if s.role == "lm"), stats)

    # ------------------------------------------------------------------ samples
    def _samples(self, examples: list[CSITExample]) -> tuple[list[_Sample], int]:
        summary = self.summary_token_ids
        t = len(summary)
        samples: list[_Sample] = []
        group_size = None
        num_queries = num_passages = num_lm = 0
        for i, ex in enumerate(examples):
            session = _keep_last(list(ex.session), self.max_session_len)
            if not session:
                raise ValueError(f"example {i}: empty session")
            is_retrieval = ex.positive is not None
            shared_query = is_retrieval and ex.response is not None and self.query_from_lm_sample
            if is_retrieval:
                group = [ex.positive, *ex.negatives]
                if group_size is None:
                    group_size = len(group)
                elif len(group) != group_size:
                    raise ValueError(
                        f"example {i} has {len(group) - 1} hard negatives, earlier ones {group_size - 1}: the Tevatron "
                        "layout needs the same number per query"
                    )
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
        return samples, group_size or 0


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
        )
    raise TypeError(f"examples must be CSITExample or mappings, got {type(example).__name__}")
