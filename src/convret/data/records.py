"""The records every reader yields, whatever the file format: text only, nothing tokenised yet.

- :class:`Passage`: one passage of a collection (or a positive / negative attached to a training example).
- :class:`Turn`: one turn of a conversation, ``role`` ``"user"`` or ``"assistant"``.
- :class:`TrainingExample`: one training example: a session (earlier turns + the current user query), its
  gold passage, hard negatives and the response the LM loss learns.
- :class:`EvalTurn`: one evaluation query: a session to embed, with its query id for qrels and runs.
- :class:`CSITExample`: a training example once tokenised (:class:`convret.data.SequenceFormatter` makes
  them, :class:`convret.CSITCollator` packs them; also importable as ``convret.CSITExample``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

__all__ = ["Passage", "Turn", "TrainingExample", "EvalTurn", "CSITExample", "USER", "ASSISTANT"]

USER = "user"
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Passage:
    """A passage. ``id`` is the collection's docid (a string, as in TREC qrels and runs)."""

    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Turn:
    """One conversation turn: ``role`` is :data:`USER` or :data:`ASSISTANT`."""

    role: str
    text: str


@dataclass
class TrainingExample:
    """One training example.

    Attributes:
        id: ``{conv_id}_{turn}`` (the turn's number in its conversation, as the format counts it).
        history: earlier turns of the session, oldest first (user and assistant alternating).
        query: the current user utterance.
        positive: the gold passage, or ``None`` (an LM-only example). In ChatRetriever's UltraChat format it is
            the next Assistant turn (id ``{conv_id}_{turn}_pos``); in QReCC / TopiOCQA style data and the sample
            world it is a passage of the collection, with the collection's id.
        negatives: hard negatives (any number, possibly none).
        response: the text the session-masked LM loss learns to generate from the summary tokens, or ``None``.
            UltraChat: the positive's text; triplet data (QReCC, TopiOCQA, the sample world): the answer.
        rewrite: a manual, self-contained rewrite of the query, when the data has one.
        positives: every gold passage when the data gives several (Tevatron's ``positive_passages``;
            ``positive`` is the first of them); empty when there is only ``positive``. Training samples one of
            them per epoch (:class:`convret.train.data.TrainingDataset`).
    """

    id: str
    history: list[Turn]
    query: str
    positive: Passage | None = None
    negatives: list[Passage] = field(default_factory=list)
    response: str | None = None
    rewrite: str | None = None
    positives: list[Passage] = field(default_factory=list)


@dataclass
class EvalTurn:
    """One evaluation query.

    Attributes:
        qid: the query id of qrels and runs, ``{conv_id}_{turn_id}`` (every supported set's convention).
        conv_id, turn_id: as the file spells them.
        history: earlier turns, oldest first.
        query: the current user utterance.
        rewrite: the manual rewrite, when present (the "oracle" query of the field's tables).
        response: the reference response, when present (generation metrics).
        positive_texts: gold passage texts carried by the file itself, when present.
        ptkb: the user's personal text knowledge base (TREC iKAT's PTKB statements, in the topic's order), when
            the file has one: optional context a caller may add to the session (e.g. as an instruction);
            readers never put it into ``history``.
        positive_ids: gold passage ids carried by the file itself (SCAI-QReCC's ``Truth_passages``), when
            present: the same as the set's qrels for this qid.
    """

    qid: str
    conv_id: str
    turn_id: str
    history: list[Turn]
    query: str
    rewrite: str | None = None
    response: str | None = None
    positive_texts: list[str] = field(default_factory=list)
    ptkb: list[str] = field(default_factory=list)
    positive_ids: list[str] = field(default_factory=list)


@dataclass
class CSITExample:
    """One training example, already tokenised (ids, no special summary tokens).

    ``positive`` / ``negatives`` make it a retrieval example (its session is embedded as a query);
    ``response`` makes it an LM example. An example may be both, or either.

    ``passage_ids``: ids of ``[positive, *negatives]`` (strings or any hashable with a stable ``str``), used to
    keep a passage that is also another query's positive out of that query's negatives (several turns of one
    conversation often share a gold passage). Without them the collator identifies passages by content."""

    session: Sequence[int]
    positive: Sequence[int] | None = None
    negatives: Sequence[Sequence[int]] = ()
    response: Sequence[int] | None = None
    passage_ids: Sequence[Hashable] | None = None
