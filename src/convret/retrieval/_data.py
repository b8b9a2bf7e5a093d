"""The data layer as retrieval sees it: readers, ``write_run`` and the sequence formatter of ``convret.data``.

Every retrieval command formats text exactly as training did: :func:`formatter_for` builds
``convret.data.SequenceFormatter`` from the checkpoint's :class:`RetrieverConfig` fields.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from ..data.records import EvalTurn, Passage, Turn

__all__ = ["check_input", "formatter_for", "iter_collection", "iter_conversations", "load_qrels", "load_run", "save_run",
           "passage_ids", "select_passages", "session_ids", "text_wrapping", "unique_passages"]


def formatter_for(tokenizer: Any, config: Any) -> Any:
    """The training-time formatter for ``config`` (a :class:`RetrieverConfig`)."""
    from ..data.sequences import SequenceFormatter

    return SequenceFormatter(tokenizer, max_session_len=config.max_session_len,
                             max_passage_len=config.max_passage_len, max_response_len=config.max_response_len,
                             instruction=config.instruction, passage_instruction=config.passage_instruction)


def passage_ids(formatter: Any, config: Any, passage: Passage | str) -> list[int]:
    """Token ids of a passage to embed: the formatted passage, then the summary block when trained so
    (``RetrieverConfig.summary_block``: the summary tokens, after the separator under chatretriever_compat)."""
    ids = list(formatter.passage(passage))
    return ids + config.summary_block() if config.summary_on_passages else ids


def session_ids(formatter: Any, config: Any, history: Sequence[Turn], query: str) -> list[int]:
    """Token ids of a session to embed: the formatted session, then the summary block."""
    return list(formatter.session(history, query)) + config.summary_block()


def text_wrapping(tokenizer: Any, render: Callable[[str], Sequence[int]]) -> tuple[list[int], list[int]]:
    """``(prefix ids, suffix ids)`` that ``render`` (a formatter's ``passage`` or ``response``) puts around a
    text's own tokens: whatever the chat template writes before and after a message, found by rendering probe
    texts, so it follows the formatter exactly.

    Raises:
        ValueError: no probe's tokens appear intact in its rendering (the text is not tokenized on its own).
    """
    special = set(tokenizer.all_special_ids)
    plain = [i for i in range(min(len(tokenizer), 4096)) if i not in special]
    probes = [tokenizer.decode(plain[5:8]), "hello world", "x", "Paris is a city"]
    tokens = {probe: list(tokenizer(probe, add_special_tokens=False)["input_ids"]) for probe in probes}
    rendered = {probe: list(render(probe)) for probe in probes if tokens[probe]}
    for probe, ids in rendered.items():
        text_ids = tokens[probe]
        for start in range(len(ids) - len(text_ids), -1, -1):  # the last occurrence: the message comes last
            if ids[start : start + len(text_ids)] != text_ids:
                continue
            prefix, suffix = ids[:start], ids[start + len(text_ids):]
            # the same wrapper around every other probe, or the match was a coincidence
            if all(other == prefix + tokens[p] + suffix for p, other in rendered.items() if p != probe):
                return prefix, suffix
    raise ValueError("cannot locate a text's tokens inside its formatted ids: this tokenizer re-tokenizes a "
                     "message's text together with the template around it")


def iter_collection(path: str | os.PathLike, format: str = "auto") -> Iterator[Passage]:
    """The passages of ``path`` (strict), each id one an id file can hold (:mod:`convret.retrieval.ids`; else an
    error naming the file and line)."""
    from ..data import ReadReport, read_collection

    report = ReadReport()
    return _id_checked(read_collection(path, format=format, strict=True, report=report), "id", path, report)


def iter_conversations(path: str | os.PathLike, format: str = "auto") -> Iterator[EvalTurn]:
    """The evaluation turns of ``path`` (strict), each query id one an id file can hold (else an error naming the
    file and line)."""
    from ..data import ReadReport, read_conversations

    report = ReadReport()
    return _id_checked(read_conversations(path, format=format, strict=True, report=report), "qid", path, report)


def _id_checked(items: Iterator[Any], key: str, path: str | os.PathLike, report: Any) -> Iterator[Any]:
    from .ids import check_id, id_problem

    for item in items:
        ident = getattr(item, key)
        if id_problem(ident) is not None:
            check_id(ident, f"{path}:{report.line}")
        yield item


def check_input(path: str | os.PathLike, format: str, kind: str) -> str:
    """Validate an input file before any model is loaded: it exists, its format (``"auto"``: detected) is one of
    ``kind``'s (``"collection"`` or ``"conversations"``) and its first record reads. Returns the format.

    Raises:
        ValueError (``convret.data.DataError``): naming the file, its line and what to do.
    """
    from ..data import DataError, detect_format
    from ..data.readers import COLLECTION_FORMATS, CONVERSATION_FORMATS

    formats, noun = ((COLLECTION_FORMATS, "collection of passages") if kind == "collection"
                     else (CONVERSATION_FORMATS, "conversation file"))
    if not Path(path).is_file():
        raise DataError(path, 0, "no such file")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in formats:
        raise DataError(path, 0, f"a {fmt} file, not a {noun} (its formats: {', '.join(formats)})"
                                 + (" given as --format" if format != "auto" else ""))
    read = iter_collection if kind == "collection" else iter_conversations
    if next(iter(read(path, fmt)), None) is None:
        raise DataError(path, 0, f"empty {noun}")
    return fmt


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    from ..data import read_qrels

    return read_qrels(path, strict=True)


def load_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    from ..data import read_run

    return read_run(path, strict=True)


def save_run(path: str | os.PathLike, results: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> None:
    from ..data import write_run

    write_run(path, results, tag)



def select_passages(path: str | os.PathLike, ids: Collection[str], format: str = "auto") -> dict[str, Passage]:
    """``{id: passage}`` of the passages of the collection ``path`` whose id is in ``ids``: one streaming pass
    that keeps only those (memory bounded by what is asked for, not by the collection); it stops once every id is
    found. An id the collection lacks is simply absent from the result."""
    wanted = set(ids)
    found: dict[str, Passage] = {}
    if not wanted:
        return found
    for passage in iter_collection(path, format):
        if passage.id in wanted and passage.id not in found:
            found[passage.id] = passage
            if len(found) == len(wanted):
                break
    return found


def unique_passages(path: str | os.PathLike, format: str = "auto") -> Iterator[Passage]:
    """The passages of the collection ``path`` (:func:`iter_collection`), raising ``ValueError`` on a duplicate id
    (naming both positions) and, at the end, on an empty collection. Holds every id seen."""
    seen: dict[str, int] = {}
    for n, passage in enumerate(iter_collection(path, format)):
        if passage.id in seen:
            raise ValueError(f"{path}: duplicate passage id {passage.id!r} (passages {seen[passage.id] + 1} and "
                             f"{n + 1}): ids must be unique")
        seen[passage.id] = n
        yield passage
    if not seen:
        raise ValueError(f"{path}: empty collection (no passages)")
