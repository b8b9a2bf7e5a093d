"""Readers for the field's data formats, streaming one record at a time, and TREC qrels / run writers.

Every reader is a generator: a file of millions of lines is never loaded whole (JSON arrays are parsed
incrementally too). A malformed record is reported with file, line and reason (``logging`` warning on the
``convret.data`` logger), skipped and counted in a :class:`ReadReport`; a one-line summary follows at the end
when anything was skipped. ``strict=True`` raises :class:`DataError` at the first bad record instead.

Formats (``detect_format`` names):

- ``ultrachat``: ChatRetriever's training jsonl ``{"conv_id", "conversation": [{"role", "text", "rewrite"?,
  "neg_texts"?}]}`` -> :class:`TrainingExample` per User turn.
- ``tevatron``: Tevatron training jsonl, legacy ``{"query_id", "query", "positive_passages",
  "negative_passages"}`` or new ``{"query_id", "query_text", "positive_document_ids",
  "negative_document_ids"}`` (joined with a corpus by docid).
- ``chatretriever-eval``: ``[{"conv_id", "turns": [{"turn_id", "question", "manual_rewrite"?, "response"?,
  "pos_psg_text"?}]}]``.
- ``qrecc`` / ``topiocqa``: one record per turn ``{"Conversation_no", "Turn_no", "Question", "Answer",
  "Rewrite"?, "Context"}`` (+ ``Gold_passage`` in TopiOCQA): evaluation turns, or training triplets.
- ``cast``: TREC CAsT topics ``[{"number", "turn": [{"number", "raw_utterance",
  "manual_rewritten_utterance"?, "passage"?}]}]``.
- ``collection``: jsonl ``{"id", "text", "title"?}``, Tevatron corpus ``{"docid", "title", "text"}`` or TSV
  ``pid<TAB>text``.
- ``qrels`` (``qid 0 docid rel``) and ``run`` (``qid Q0 docid rank score tag``).

A "record" is one line of a jsonl / TSV / TREC file, or one element of a JSON array (a conversation, a topic or
a turn, as the format nests them); the line of an array element is the line its ``{`` is on.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .._io import atomic_write
from .records import ASSISTANT, USER, EvalTurn, Passage, TrainingExample, Turn

__all__ = [
    "DataError", "ReadReport", "MAX_REPORTED_ERRORS", "FORMATS", "TRAINING_FORMATS", "CONVERSATION_FORMATS",
    "detect_format", "read_training", "read_conversations", "read_collection", "read_qrels", "read_run",
    "write_run", "write_qrels", "iter_records",
]

logger = logging.getLogger("convret.data")

#: errors kept (and logged) per file; ``ReadReport.skipped`` still counts every bad record
MAX_REPORTED_ERRORS = 100

FORMATS = ("ultrachat", "tevatron", "chatretriever-eval", "qrecc", "topiocqa", "cast", "collection", "qrels", "run")
TRAINING_FORMATS = ("ultrachat", "tevatron", "qrecc", "topiocqa")
CONVERSATION_FORMATS = ("chatretriever-eval", "qrecc", "topiocqa", "cast")

PathLike = str | os.PathLike


class DataError(ValueError):
    """A malformed record: ``str()`` is ``"{path}:{line}: {reason}"``."""

    def __init__(self, path: PathLike, line: int, reason: str):
        self.path = str(path)
        self.line = int(line)
        self.reason = reason
        super().__init__(f"{self.path}:{self.line}: {reason}")


@dataclass
class ReadReport:
    """What a reader saw. Pass one in (``report=ReadReport()``) and read it after the iteration ends.

    Attributes:
        format: the format read.
        path: the file.
        records: good records (file records: lines, or JSON array elements).
        skipped: bad records, every one counted.
        errors: ``(line, reason)`` of the first :data:`MAX_REPORTED_ERRORS` bad records.
        items: objects yielded (examples, turns, passages, qrels / run lines); an UltraChat conversation of
            three User turns is one record and three items.
    """

    format: str = ""
    path: str = ""
    records: int = 0
    skipped: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    items: int = 0

    def add_error(self, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append((line, reason))
            logger.warning("%s:%d: %s (record skipped)", self.path, line, reason)
        elif len(self.errors) == MAX_REPORTED_ERRORS and self.skipped == MAX_REPORTED_ERRORS + 1:
            logger.warning("%s: more than %d bad records; further ones are counted, not shown", self.path,
                           MAX_REPORTED_ERRORS)

    def summary(self) -> str:
        text = f"{self.path}: {self.format}: {self.records} records read, {self.skipped} skipped"
        if self.skipped > len(self.errors):
            text += f" (first {len(self.errors)} shown)"
        return text

    def to_json(self) -> dict[str, Any]:
        """``{"format", "records", "skipped", "errors": [{"line", "reason"}]}`` (``convret data check --json``)."""
        return {"format": self.format, "records": self.records, "skipped": self.skipped,
                "errors": [{"line": line, "reason": reason} for line, reason in self.errors]}


class _Bad(Exception):
    """Raised by a record parser: the record is malformed for ``reason``."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal  # the rest of the file cannot be read (a syntax error inside a JSON array)


# ------------------------------------------------------------------------------------------ raw records
def _open(path: PathLike):
    return open(path, "r", encoding="utf-8", newline="")


def _first_char(path: PathLike) -> str:
    with _open(path) as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]


def _iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    with _open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if number == 1:
                line = line.lstrip("\ufeff")
            if line.strip():
                yield number, line


def _iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    for number, line in _iter_lines(path):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, _Bad(f"invalid JSON: {error.msg} at column {error.colno}")


def _iter_json_array(path: PathLike, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, parsed incrementally (memory: one element plus one chunk)."""
    decoder = json.JSONDecoder()
    with _open(path) as handle:
        buf = handle.read(chunk_size).lstrip("\ufeff")
        eof = not buf
        line = 1
        pos = 0

        def skip_ws() -> None:
            nonlocal pos, line, buf, eof
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or eof:
                    return
                more = handle.read(chunk_size)
                eof = not more
                buf, pos = buf[pos:] + more, 0

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            yield line, _Bad("expected a JSON array ('[')", fatal=True)
            return
        pos += 1
        expect_value = True
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                yield line, _Bad("invalid JSON: the array is not closed (file truncated?)", fatal=True)
                return
            if buf[pos] == "]" and (first or not expect_value):
                return
            if not expect_value:
                if buf[pos] != ",":
                    yield line, _Bad(f"invalid JSON: expected ',' or ']' between array elements, got {buf[pos]!r}",
                                     fatal=True)
                    return
                pos += 1
                expect_value = True
                continue
            start_line = line
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as error:
                    incomplete = error.pos >= len(buf) - 1 or error.msg.startswith("Unterminated string")
                    if eof or not incomplete:
                        line_of_error = start_line + buf.count("\n", pos, error.pos)
                        yield line_of_error, _Bad(f"invalid JSON: {error.msg}; the rest of the file cannot be read",
                                                  fatal=True)
                        return
                    more = handle.read(max(chunk_size, len(buf)))
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
            line += buf.count("\n", pos, end)
            pos = end
            if pos > chunk_size:
                buf, pos = buf[pos:], 0
            yield start_line, value
            expect_value = False
            first = False


def iter_records(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, object)`` of a JSON file: a top-level array's elements, or a jsonl file's lines. A record that
    is not valid JSON comes as ``(line, _Bad)``."""
    if _first_char(path) == "[":
        return _iter_json_array(path)
    return _iter_jsonl(path)


# ------------------------------------------------------------------------------------------ format detection
def detect_format(path: PathLike) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), from its first record.

    Raises:
        DataError: the file is empty or its first record matches no known format.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "no such file")
    first = _first_char(path)
    if first == "":
        raise DataError(path, 0, "empty file")
    if first in "[{":
        for line, obj in iter_records(path):
            if isinstance(obj, _Bad):
                raise DataError(path, line, f"cannot detect the format: {obj.reason}")
            fmt = _format_of_object(obj)
            if fmt is None:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(path, line, f"cannot detect the format from the first record (keys {keys}); "
                                            "pass format=...")
            return fmt
        raise DataError(path, 0, "empty JSON array")
    for line, text in _iter_lines(path):
        tab = text.split("\t")
        cols = text.split()
        if len(tab) >= 2 and len(cols) != 4 and len(cols) != 6:
            return "collection"
        if len(cols) == 6 and cols[1] == "Q0":
            return "run"
        if len(cols) == 4 and _is_int(cols[3]):
            return "qrels"
        if len(cols) == 6 and _is_int(cols[3]) and _is_float(cols[4]):
            return "run"
        if len(tab) >= 2:
            return "collection"
        raise DataError(path, line, "cannot detect the format of this text file (not a TSV collection, TREC "
                                    "qrels or run); pass format=...")
    raise DataError(path, 0, "empty file")


def _format_of_object(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "conversation" in keys:
        return "ultrachat"
    if "query_id" in keys:
        return "tevatron"
    if "turns" in keys:
        return "chatretriever-eval"
    if "turn" in keys and "number" in keys:
        return "cast"
    if "Conversation_no" in keys:
        return "topiocqa" if keys & {"Gold_passage", "Topic", "Topic_section", "is_nq"} else "qrecc"
    if "docid" in keys or ("id" in keys and "text" in keys) or "contents" in keys:
        return "collection"
    return None


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ the driver
def _drive(path: PathLike, fmt: str, records: Iterable[tuple[int, Any]], parse: Callable[[Any], list],
           strict: bool, report: ReadReport | None) -> Iterator[Any]:
    report = report if report is not None else ReadReport()
    report.format, report.path = fmt, str(path)
    for line, obj in records:
        try:
            if isinstance(obj, _Bad):
                raise obj
            items = parse(obj)
        except _Bad as bad:
            if strict:
                raise DataError(path, line, bad.reason) from None
            report.add_error(line, bad.reason)
            if bad.fatal:
                break
            continue
        report.records += 1
        for item in items:
            report.items += 1
            yield item
    if report.skipped:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())


def _resolve(path: PathLike, fmt: str, allowed: Sequence[str], what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in allowed:
        raise DataError(path, 0, f"format {fmt!r} holds no {what} (readable formats: {', '.join(allowed)})")
    return fmt


# ------------------------------------------------------------------------------------------ field helpers
def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str = "", optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise _Bad(f"{where or 'record'} must be a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise _Bad(f"missing field {key!r}" + (f" in {where}" if where else ""))
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, (int, str), (str, int)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"field {key!r}" + (f" in {where}" if where else "") +
                   f" must be {names}, got {type(value).__name__}")
    return value


def _text(obj: Any, key: str, where: str = "", optional: bool = False) -> str | None:
    value = _field(obj, key, str, where, optional)
    if value is None:
        return None
    if not value.strip():
        if optional:
            return None
        raise _Bad(f"empty text in field {key!r}" + (f" of {where}" if where else ""))
    return value


def _ident(obj: Any, key: str, where: str = "") -> str:
    value = _field(obj, key, (str, int), where)
    value = str(value).strip()
    if not value:
        raise _Bad(f"empty id in field {key!r}" + (f" of {where}" if where else ""))
    return value


def _passage_obj(obj: Any, where: str, id_keys: Sequence[str] = ("docid", "id", "passage_id")) -> Passage:
    if not isinstance(obj, dict):
        raise _Bad(f"{where} must be a JSON object, got {type(obj).__name__}")
    key = next((k for k in id_keys if obj.get(k) is not None), None)
    if key is None:
        raise _Bad(f"missing field {id_keys[0]!r} in {where}")
    text_key = "text" if "text" in obj else "contents" if "contents" in obj else "text"
    return Passage(_ident(obj, key, where), _text(obj, text_key, where), _field(obj, "title", str, where, True) or "")


# ------------------------------------------------------------------------------------------ training
def read_training(
    path: PathLike,
    format: str = "auto",
    corpus: PathLike | Mapping[str, Passage] | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
) -> Iterator[TrainingExample]:
    """Training examples of ``path``, one at a time.

    Args:
        path: an UltraChat-style jsonl (ChatRetriever), a Tevatron jsonl (legacy or new schema), or a QReCC /
            TopiOCQA-style triplet file (JSON array or jsonl).
        format: ``"auto"`` (from the first record) or one of :data:`TRAINING_FORMATS`.
        corpus: for Tevatron's new schema, the collection its document ids point into: a path (read with
            :func:`read_collection` into memory once) or a mapping ``docid -> Passage``.
        strict: raise :class:`DataError` at the first bad record instead of skipping it.
        report: a :class:`ReadReport` filled as the file is read.

    Yields:
        :class:`TrainingExample`. UltraChat: one per User turn (id ``{conv_id}_{k}``, k = 1, 2, ... the User
        turn's number; positive = the next Assistant text with id ``{conv_id}_{k}_pos`` unless the turn gives
        ``pos_id``; negatives = its ``neg_texts``; response = the positive text). Tevatron: one per line (id =
        ``query_id``, positive = the first positive passage, negatives = all negative passages, no response).
        QReCC / TopiOCQA: one per turn (id ``{Conversation_no}_{Turn_no}``, positive = ``Gold_passage``,
        negatives = ``Hard_negatives``, response = ``Answer``; a turn without ``Gold_passage`` is LM-only).
    """
    fmt = _resolve(path, format, TRAINING_FORMATS, "training examples")
    if fmt == "ultrachat":
        parse = _parse_ultrachat
    elif fmt == "tevatron":
        lookup = _corpus_lookup(corpus)
        parse = lambda obj: _parse_tevatron(obj, lookup)  # noqa: E731
    else:
        parse = _parse_triplet
    return _drive(path, fmt, iter_records(path), parse, strict, report)


def _corpus_lookup(corpus: PathLike | Mapping[str, Passage] | None) -> Mapping[str, Passage] | None:
    if corpus is None or isinstance(corpus, Mapping):
        return corpus
    return {p.id: p for p in read_collection(corpus, strict=True)}


_ROLES = {"user": USER, "assistant": ASSISTANT}


def _parse_ultrachat(obj: Any) -> list[TrainingExample]:
    conv_id = _ident(obj, "conv_id")
    turns = _field(obj, "conversation", list)
    if not turns:
        raise _Bad("empty 'conversation'")
    parsed = []
    for i, turn in enumerate(turns):
        where = f"conversation[{i}]"
        role = _field(turn, "role", str, where)
        if role.lower() not in _ROLES:
            raise _Bad(f"unknown role {role!r} in {where} (expected 'User' or 'Assistant')")
        parsed.append((_ROLES[role.lower()], _text(turn, "text", where), turn))
    examples = []
    history: list[Turn] = []
    user_number = 0
    for i, (role, text, turn) in enumerate(parsed):
        if role == USER:
            user_number += 1
            if i + 1 >= len(parsed) or parsed[i + 1][0] != ASSISTANT:
                raise _Bad(f"User turn {user_number} (conversation[{i}]) has no following Assistant turn")
            answer = parsed[i + 1][2]
            where = f"conversation[{i + 1}]"
            negs = _field(answer, "neg_texts", list, where, optional=True) or []
            neg_ids = _field(answer, "neg_ids", list, where, optional=True)
            if neg_ids is not None and len(neg_ids) != len(negs):
                raise _Bad(f"{where}: {len(neg_ids)} neg_ids for {len(negs)} neg_texts")
            negatives = []
            for j, neg in enumerate(negs):
                if not isinstance(neg, str):
                    raise _Bad(f"{where}.neg_texts[{j}] must be str, got {type(neg).__name__}")
                if not neg.strip():
                    raise _Bad(f"empty text in {where}.neg_texts[{j}]")
                nid = str(neg_ids[j]) if neg_ids is not None else f"{conv_id}_{user_number}_neg{j}"
                negatives.append(Passage(nid, neg))
            pos_id = _field(answer, "pos_id", (str, int), where, optional=True)
            positive = Passage(str(pos_id) if pos_id is not None else f"{conv_id}_{user_number}_pos", parsed[i + 1][1])
            rewrite = _text(turn, "rewrite", f"conversation[{i}]", optional=True)
            examples.append(TrainingExample(f"{conv_id}_{user_number}", list(history), text, positive, negatives,
                                            positive.text, rewrite))
        history.append(Turn(role, text))
    if not examples:
        raise _Bad("no User turn in 'conversation'")
    return examples


def _parse_tevatron(obj: Any, corpus: Mapping[str, Passage] | None) -> list[TrainingExample]:
    qid = _ident(obj, "query_id")
    if "positive_passages" in obj or "query" in obj:
        query = _text(obj, "query")
        positives = _field(obj, "positive_passages", list)
        negatives = _field(obj, "negative_passages", list, optional=True) or []
        pos = [_passage_obj(p, f"positive_passages[{j}]") for j, p in enumerate(positives)]
        neg = [_passage_obj(p, f"negative_passages[{j}]") for j, p in enumerate(negatives)]
    else:
        query = _text(obj, "query_text")
        pos_ids = _field(obj, "positive_document_ids", list)
        neg_ids = _field(obj, "negative_document_ids", list, optional=True) or []
        for name, ids in (("positive_document_ids", pos_ids), ("negative_document_ids", neg_ids)):
            for j, d in enumerate(ids):
                if not isinstance(d, (str, int)) or isinstance(d, bool):
                    raise _Bad(f"{name}[{j}] must be a str or int docid, got {type(d).__name__}")
        if corpus is None:  # validation only (``convret data check`` without --corpus)
            if not pos_ids:
                raise _Bad("empty 'positive_document_ids'")
            return []
        missing = [str(d) for d in [*pos_ids, *neg_ids] if str(d) not in corpus]
        if missing:
            raise _Bad(f"docid {missing[0]!r} is not in the corpus" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
        pos = [corpus[str(d)] for d in pos_ids]
        neg = [corpus[str(d)] for d in neg_ids]
    if not pos:
        raise _Bad("no positive passage")
    return [TrainingExample(qid, [], query, pos[0], neg, None, None, positives=pos if len(pos) > 1 else [])]


def _context_turns(obj: Any) -> list[Turn]:
    context = _field(obj, "Context", list, optional=True) or []
    turns = []
    for j, text in enumerate(context):
        if not isinstance(text, str):
            raise _Bad(f"Context[{j}] must be str, got {type(text).__name__}")
        if not text.strip():
            raise _Bad(f"empty text in Context[{j}]")
        turns.append(Turn(USER if j % 2 == 0 else ASSISTANT, text))
    return turns


def _parse_triplet(obj: Any) -> list[TrainingExample]:
    qid = f"{_ident(obj, 'Conversation_no')}_{_ident(obj, 'Turn_no')}"
    query = _text(obj, "Question")
    answer = _text(obj, "Answer", optional=True)
    rewrite = _text(obj, "Rewrite", optional=True)
    gold = obj.get("Gold_passage")
    positive = _passage_obj(gold, "Gold_passage") if gold else None
    negs = _field(obj, "Hard_negatives", list, optional=True) or []
    negatives = [_passage_obj(p, f"Hard_negatives[{j}]") for j, p in enumerate(negs)]
    if positive is None and answer is None:
        raise _Bad("neither 'Gold_passage' nor 'Answer': nothing to train on")
    if positive is None and negatives:
        raise _Bad("'Hard_negatives' without a 'Gold_passage'")
    return [TrainingExample(qid, _context_turns(obj), query, positive, negatives, answer, rewrite)]


# ------------------------------------------------------------------------------------------ conversations
def read_conversations(
    path: PathLike,
    format: str = "auto",
    strict: bool = False,
    report: ReadReport | None = None,
) -> Iterator[EvalTurn]:
    """Evaluation turns of ``path``, one at a time, qid ``{conv}_{turn}``.

    Args:
        path: ChatRetriever eval JSON, QReCC JSON, TopiOCQA JSON or TREC CAsT topics (JSON arrays; jsonl with
            one record per line is read too).
        format: ``"auto"`` or one of :data:`CONVERSATION_FORMATS`.
        strict, report: as in :func:`read_training`.

    Yields:
        :class:`EvalTurn`. History: ChatRetriever eval = earlier questions, each followed by its ``response``
        when the file has one; QReCC / TopiOCQA = ``Context`` (alternating user / assistant); CAsT = earlier
        ``raw_utterance``\\ s, each followed by its ``passage`` (CAsT 2021-22 canonical response) when present.
        A conversation (ChatRetriever, CAsT) with one malformed turn is skipped whole.
    """
    fmt = _resolve(path, format, CONVERSATION_FORMATS, "conversations")
    parse = {"chatretriever-eval": _parse_chatretriever_eval, "cast": _parse_cast}.get(fmt, _parse_qa_turn)
    return _drive(path, fmt, iter_records(path), parse, strict, report)


def _parse_chatretriever_eval(obj: Any) -> list[EvalTurn]:
    conv_id = _ident(obj, "conv_id")
    turns = _field(obj, "turns", list)
    if not turns:
        raise _Bad("empty 'turns'")
    out: list[EvalTurn] = []
    history: list[Turn] = []
    seen = set()
    for i, turn in enumerate(turns):
        where = f"turns[{i}]"
        turn_id = _ident(turn, "turn_id", where)
        if turn_id in seen:
            raise _Bad(f"duplicate turn_id {turn_id!r} in {where}")
        seen.add(turn_id)
        question = _text(turn, "question", where)
        response = _text(turn, "response", where, optional=True)
        positives = turn.get("pos_psg_text")
        if positives is None:
            positives = []
        elif isinstance(positives, str):
            positives = [positives]
        elif not isinstance(positives, list) or not all(isinstance(p, str) for p in positives):
            raise _Bad(f"field 'pos_psg_text' in {where} must be str or list of str")
        out.append(EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, list(history), question,
                            _text(turn, "manual_rewrite", where, optional=True), response, list(positives)))
        history.append(Turn(USER, question))
        if response is not None:
            history.append(Turn(ASSISTANT, response))
    return out


def _parse_qa_turn(obj: Any) -> list[EvalTurn]:
    conv_id, turn_id = _ident(obj, "Conversation_no"), _ident(obj, "Turn_no")
    question = _text(obj, "Question")
    gold = obj.get("Gold_passage")
    positives = [_passage_obj(gold, "Gold_passage").text] if gold else []
    return [EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, _context_turns(obj), question,
                     _text(obj, "Rewrite", optional=True), _text(obj, "Answer", optional=True), positives)]


def _parse_cast(obj: Any) -> list[EvalTurn]:
    conv_id = _ident(obj, "number")
    turns = _field(obj, "turn", list)
    if not turns:
        raise _Bad("empty 'turn'")
    out: list[EvalTurn] = []
    history: list[Turn] = []
    for i, turn in enumerate(turns):
        where = f"turn[{i}]"
        turn_id = _ident(turn, "number", where)
        utterance = _text(turn, "raw_utterance", where)
        response = _text(turn, "passage", where, optional=True)
        out.append(EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, list(history), utterance,
                            _text(turn, "manual_rewritten_utterance", where, optional=True), response, []))
        history.append(Turn(USER, utterance))
        if response is not None:
            history.append(Turn(ASSISTANT, response))
    return out


# ------------------------------------------------------------------------------------------ collections
def read_collection(
    path: PathLike,
    format: str = "auto",
    strict: bool = False,
    report: ReadReport | None = None,
) -> Iterator[Passage]:
    """Passages of a collection, one at a time (constant memory: fine for millions of lines).

    Args:
        path: jsonl ``{"id", "text", "title"?}``, Tevatron corpus jsonl ``{"docid", "title", "text"}`` or TSV
            ``pid<TAB>text`` (MS MARCO; the text is everything after the first tab).
        format: ``"auto"`` or ``"collection"``.
        strict, report: as in :func:`read_training`.

    For multi-process encoding of a large collection, :func:`convret.data.arrow.load_collection` gives a
    memory-mapped Hugging Face ``datasets.Dataset`` sharded by rank.
    """
    fmt = _resolve(path, format, ("collection",), "passages")
    if _first_char(path) in "[{":
        return _drive(path, fmt, iter_records(path), _parse_passage_json, strict, report)
    return _drive(path, fmt, _iter_lines(path), _parse_passage_tsv, strict, report)


def _parse_passage_json(obj: Any) -> list[Passage]:
    return [_passage_obj(obj, "record", id_keys=("id", "docid", "_id", "pid"))]


def _parse_passage_tsv(line: str) -> list[Passage]:
    pid, sep, text = line.partition("\t")
    if not sep:
        raise _Bad("expected 'pid<TAB>text'")
    if not pid.strip():
        raise _Bad("empty pid")
    if not text.strip():
        raise _Bad("empty text")
    return [Passage(pid.strip(), text)]


# ------------------------------------------------------------------------------------------ qrels and runs
def read_qrels(path: PathLike, strict: bool = False, report: ReadReport | None = None) -> dict[str, dict[str, int]]:
    """TREC qrels ``qid 0 docid rel`` (whitespace-separated, rel an integer grade) -> ``{qid: {docid: rel}}``.

    A docid listed twice for one query is a bad line (the first grade is kept)."""
    qrels: dict[str, dict[str, int]] = {}

    def parse(line: str) -> list:
        cols = line.split()
        if len(cols) != 4:
            raise _Bad(f"expected 4 columns 'qid 0 docid rel', got {len(cols)}")
        qid, _, docid, rel = cols
        if not _is_int(rel):
            raise _Bad(f"relevance {rel!r} is not an integer")
        if docid in qrels.get(qid, {}):
            raise _Bad(f"duplicate judgement of {docid!r} for query {qid!r}")
        qrels.setdefault(qid, {})[docid] = int(rel)
        return [None]

    for _ in _drive(path, "qrels", _iter_lines(_existing(path)), parse, strict, report):
        pass
    return qrels


def read_run(path: PathLike, strict: bool = False, report: ReadReport | None = None) -> dict[str, dict[str, float]]:
    """TREC run ``qid Q0 docid rank score tag`` -> ``{qid: {docid: score}}`` (ranks are checked to be integers;
    evaluation orders by score, as trec_eval does)."""
    run: dict[str, dict[str, float]] = {}

    def parse(line: str) -> list:
        cols = line.split()
        if len(cols) != 6:
            raise _Bad(f"expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
        qid, _, docid, rank, score, _ = cols
        if not _is_int(rank):
            raise _Bad(f"rank {rank!r} is not an integer")
        if not _is_float(score):
            raise _Bad(f"score {score!r} is not a finite number")
        if docid in run.get(qid, {}):
            raise _Bad(f"docid {docid!r} listed twice for query {qid!r}")
        run.setdefault(qid, {})[docid] = float(score)
        return [None]

    for _ in _drive(path, "run", _iter_lines(_existing(path)), parse, strict, report):
        pass
    return run


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def write_run(path: PathLike, results: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> None:
    """Write a TREC run ``qid Q0 docid rank score tag`` atomically.

    Each query's ``(docid, score)`` pairs are sorted by score, descending (ties by docid, so the file is
    deterministic), and ranked from 1. Scores are written exactly (shortest round-trip repr).
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be a non-empty word without whitespace, got {tag!r}")
    with atomic_write(path) as handle:
        for qid, pairs in results.items():
            _check_word("qid", qid)
            ordered = sorted(((str(d), float(s)) for d, s in pairs), key=lambda p: (-p[1], p[0]))
            seen = set()
            for rank, (docid, score) in enumerate(ordered, 1):
                _check_word("docid", docid)
                if docid in seen:
                    raise ValueError(f"docid {docid!r} appears twice in the results of query {qid!r}")
                if not math.isfinite(score):
                    raise ValueError(f"score of {docid!r} for query {qid!r} is {score}")
                seen.add(docid)
                handle.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")


def write_qrels(path: PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Write TREC qrels ``qid 0 docid rel`` atomically, in the mapping's order."""
    with atomic_write(path) as handle:
        for qid, judged in qrels.items():
            _check_word("qid", qid)
            for docid, rel in judged.items():
                _check_word("docid", str(docid))
                if isinstance(rel, bool) or int(rel) != rel:
                    raise ValueError(f"relevance of {docid!r} for {qid!r} must be an integer, got {rel!r}")
                handle.write(f"{qid} 0 {docid} {int(rel)}\n")


def _check_word(what: str, value: Any) -> None:
    value = str(value)
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} is empty or contains whitespace: TREC files are whitespace-separated")
