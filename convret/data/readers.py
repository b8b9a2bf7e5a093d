"""Readers for the field's data formats, streaming one record at a time, and TREC qrels / run writers.

Every reader is a generator: a file of millions of lines is never loaded whole (JSON arrays are parsed
incrementally too). A malformed record is reported with file, line and reason (``logging`` warning on the
``convret.data`` logger), skipped and counted in a :class:`ReadReport`; a one-line summary follows at the end
when anything was skipped. ``strict=True`` raises :class:`DataError` at the first bad record instead.

Formats (``detect_format`` names; the tuples :data:`FORMATS`, :data:`TRAINING_FORMATS`, :data:`CONVERSATION_FORMATS`,
:data:`COLLECTION_FORMATS`, :data:`QRELS_FORMATS` list them; docs/data.md has an example of each):

- training: ``ultrachat`` (ChatRetriever), ``tevatron`` (legacy and new schema), ``qrecc`` / ``topiocqa``
  (triplets).
- evaluation conversations: ``chatretriever-eval``, ``qrecc`` / ``topiocqa``, ``cast`` (CAsT 2019-21),
  ``cast2022`` (tree, sessions follow ``parent``) / ``cast2022-flat``, ``ikat`` (TREC iKAT 2023-25, PTKB in
  :attr:`EvalTurn.ptkb`), ``convdr`` (ConvDR / COTED), ``t5qr`` (T5QR / ConvGQR), ``scai-qrecc``, ``beir-queries``
  (BEIR, mt-rag), ``tsv`` (``qid<TAB>text``, single-turn).
- collections: ``collection`` (``{"id"|"docid", "text", "title"?}`` jsonl or ``pid<TAB>text``), ``tsv``,
  ``beir-corpus``, ``msmarco-v2-passage``, ``msmarco-v2.1-segmented``, ``ikat-passages``, ``pyserini``
  (``contents``), ``dpr-tsv`` (``id<TAB>text<TAB>title`` with its header, csv quoting).
- ``qrels`` (TREC ``qid 0 docid rel``), ``beir-qrels`` (TSV with the header ``query-id corpus-id score``) and
  ``run`` (``qid Q0 docid rank score tag``).

Detection fits a format exactly (a JSON record's identifying fields; a text file's header, or its first lines),
never by a guess: a file that fits none is a :class:`DataError` asking for ``format=``.

A "record" is one line of a jsonl / TSV / TREC file, or one element of a JSON array (a conversation, a topic or
a turn, as the format nests them); the line of an array element is the line its ``{`` is on.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .._io import atomic_write
from .records import ASSISTANT, USER, EvalTurn, Passage, TrainingExample, Turn

__all__ = [
    "DataError", "ReadReport", "MAX_REPORTED_ERRORS", "FORMATS", "TRAINING_FORMATS", "CONVERSATION_FORMATS",
    "COLLECTION_FORMATS", "QRELS_FORMATS",
    "detect_format", "read_training", "read_conversations", "read_collection", "read_qrels", "read_run",
    "write_run", "write_qrels", "iter_records",
]

logger = logging.getLogger("convret.data")

#: errors kept (and logged) per file; ``ReadReport.skipped`` still counts every bad record
MAX_REPORTED_ERRORS = 100

#: formats of training examples (:func:`read_training`)
TRAINING_FORMATS = ("ultrachat", "tevatron", "qrecc", "topiocqa")
#: formats of evaluation conversations (:func:`read_conversations`)
CONVERSATION_FORMATS = ("chatretriever-eval", "qrecc", "topiocqa", "cast", "cast2022", "cast2022-flat", "ikat",
                        "convdr", "t5qr", "scai-qrecc", "beir-queries", "tsv")
#: formats of passage collections (:func:`read_collection`)
COLLECTION_FORMATS = ("collection", "tsv", "beir-corpus", "msmarco-v2-passage", "msmarco-v2.1-segmented",
                      "ikat-passages", "pyserini", "dpr-tsv")
#: formats of relevance judgements (:func:`read_qrels`)
QRELS_FORMATS = ("qrels", "beir-qrels")
#: every format name, in one place (``--format`` choices of ``convret data check`` / ``encode`` / ``evaluate``)
FORMATS = tuple(dict.fromkeys((*TRAINING_FORMATS, *CONVERSATION_FORMATS, *COLLECTION_FORMATS, *QRELS_FORMATS, "run")))

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
# ``strict=False``: a raw control character (a tab, a bare carriage return) inside a JSON string is read as itself
# instead of making the record invalid; writers outside Python leave them unescaped now and then.
_DECODER = json.JSONDecoder(strict=False)


def _open(path: PathLike, newline: str = ""):
    return open(path, "r", encoding="utf-8", newline=newline)


def _first_char(path: PathLike) -> str:
    with _open(path) as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]


def _iter_lines(path: PathLike, comments: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines. Lines end at ``\n`` only (a CRLF's ``\r`` is dropped): a
    bare ``\r`` inside a text is part of the text, not a line break. ``comments``: skip lines starting with
    ``#`` (TREC qrels and runs, as trec_eval does)."""
    with _open(path, newline="\n") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if line.endswith("\r"):
                line = line[:-1]
            if number == 1:
                line = line.lstrip("\ufeff")
            if line.strip() and not (comments and line.lstrip().startswith("#")):
                yield number, line


_PRETTY_OBJECT = ("the file is one JSON object spread over several lines (a pretty-printed JSON document), not "
                  "JSON Lines (one record per line) nor a JSON array of records: no convret format is a single JSON "
                  "object")


def _iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    first = True
    for number, line in _iter_lines(path):
        try:
            value, end = _DECODER.raw_decode(line, len(line) - len(line.lstrip()))
            if line[end:].strip():
                raise json.JSONDecodeError("Extra data", line, end)
            yield number, value
        except json.JSONDecodeError as error:
            if first and line.lstrip().startswith("{") and error.pos >= len(line.rstrip()) - 1:
                # the first object does not end on its line: a pretty-printed JSON object, not JSONL
                yield number, _Bad(_PRETTY_OBJECT, fatal=True)
                return
            yield number, _Bad(f"invalid JSON: {error.msg} at column {error.colno}")
        first = False


def _iter_json_array(path: PathLike, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, parsed incrementally (memory: one element plus one chunk)."""
    with _open(path) as handle:
        buf = handle.read(chunk_size).lstrip("\ufeff")
        eof = not buf
        line = 1
        pos = 0

        def read_more() -> None:
            nonlocal buf, pos, eof
            more = handle.read(max(chunk_size, len(buf)))
            eof = not more
            buf, pos = buf[pos:] + more, 0

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or eof:
                    return
                read_more()

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
                    value, end = _DECODER.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                    read_more()  # a number (or literal) that ends at the buffer's end may go on in the next chunk
                except json.JSONDecodeError as error:
                    # The chunk may end inside the element: in a string (the error points at its start), a
                    # literal ('fal|se'), a number or an escape (the error is within a few characters of the end).
                    incomplete = error.pos >= len(buf) - 16 or error.msg.startswith("Unterminated string")
                    if eof or not incomplete:
                        line_of_error = start_line + buf.count("\n", pos, error.pos)
                        yield line_of_error, _Bad(f"invalid JSON: {error.msg}; the rest of the file cannot be read",
                                                  fatal=True)
                        return
                    read_more()
            line += buf.count("\n", pos, end)
            pos = end
            if pos > chunk_size:
                buf, pos = buf[pos:], 0
            yield start_line, value
            expect_value = False
            first = False


def iter_records(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, object)`` of a JSON file: a top-level array's elements, or a jsonl file's lines. A record that
    is not valid JSON comes as ``(line, _Bad)``; a pretty-printed JSON object (not JSONL) as one fatal ``_Bad``."""
    if _first_char(path) == "[":
        return _iter_json_array(path)
    return _iter_jsonl(path)


_TSV_MAX_RECORD_LINES = 1000


def _split_quoted_tsv(text: str) -> list[str] | None:
    """Fields of one TSV record written by Python's ``csv`` module (``delimiter='\t'``, minimal quoting): a field
    that starts with ``"`` is quoted, ``""`` inside it is one ``"``. ``None``: a quoted field is still open at the
    end of ``text`` (it goes on on the next line)."""
    fields: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, parts = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    return None
                if k + 1 < n and text[k + 1] == '"':
                    parts.append(text[j:k + 1])
                    j = k + 2
                    continue
                parts.append(text[j:k])
                i = k + 1
                break
            fields.append("".join(parts))
            if i < n and text[i] != "\t":
                raise _Bad(f"field {len(fields)}: text after its closing quote")
        else:
            k = text.find("\t", i)
            if k < 0:
                fields.append(text[i:])
                return fields
            fields.append(text[i:k])
            i = k
        if i >= n:
            return fields
        i += 1
        if i == n:
            fields.append("")
            return fields


def _iter_quoted_tsv(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, fields)`` of a ``csv``-quoted TSV file (DPR's passage files); a quoted field may hold tabs, quotes
    and line breaks. A record that cannot be split comes as ``(line, _Bad)``."""
    with _open(path, newline="\n") as handle:
        start, pending = 0, None
        for number, raw in enumerate(handle, 1):
            raw = raw.rstrip("\n")
            if raw.endswith("\r"):
                raw = raw[:-1]
            if number == 1:
                raw = raw.lstrip("\ufeff")
            if pending is None:
                if not raw.strip():
                    continue
                start, text = number, raw
            else:
                text = pending + "\n" + raw
            try:
                fields = _split_quoted_tsv(text)
            except _Bad as bad:
                pending = None
                yield start, bad
                continue
            if fields is None:
                if number - start >= _TSV_MAX_RECORD_LINES:
                    pending = None
                    yield start, _Bad(f"a quoted field is not closed within {_TSV_MAX_RECORD_LINES} lines", fatal=True)
                    return
                pending = text
                continue
            pending = None
            yield start, fields
        if pending is not None:
            yield start, _Bad("a quoted field is not closed at the end of the file", fatal=True)


# ------------------------------------------------------------------------------------------ format detection
_DETECT_LINES = 20  # text files: this many leading lines must all fit the format


def detect_format(path: PathLike) -> str:
    """The format of ``path`` (one of :data:`FORMATS`): JSON from its first record's fields, text files from their
    first lines (a header; or the first line and 3 in 4 of the first :data:`_DETECT_LINES` fit the format exactly).
    A file that fits no format is an error asking for ``format=``, never a guess.

    Raises:
        DataError: the file is empty, or it fits no known format.
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
                raise DataError(path, line, f"cannot detect the format: the first record (keys {keys}) fits no "
                                            "format exactly; pass format=... (--format)")
            return fmt
        raise DataError(path, 0, "empty JSON array")
    lines = list(itertools.islice(_iter_lines(path), _DETECT_LINES))
    if not lines:
        raise DataError(path, 0, "empty file")
    header = [col.strip() for col in lines[0][1].split("\t")]
    if header == list(_BEIR_QRELS_HEADER):
        return "beir-qrels"
    if [col.lower() for col in header] == list(_DPR_HEADER):
        return "dpr-tsv"
    body = [text for _, text in lines if not text.lstrip().startswith("#")]
    for fmt, fits in (("qrels", _is_qrels_line), ("run", _is_run_line), ("tsv", _is_id_text_line)):
        # the first line and at least 3 in 4 of the leading lines fit (the others are bad records, reported later)
        if body and fits(body[0]) and sum(map(fits, body)) * 4 >= len(body) * 3:
            return fmt
    raise DataError(path, lines[0][0], "cannot detect the format of this text file: its first lines are not all "
                                       "TREC qrels ('qid 0 docid rel'), a TREC run ('qid Q0 docid rank score tag'), "
                                       "an 'id<TAB>text' TSV, nor headed by a BEIR qrels or DPR TSV header; pass "
                                       "format=... (--format)")


_BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")
_DPR_HEADER = ("id", "text", "title")


def _is_qrels_line(text: str) -> bool:
    cols = text.split()
    return len(cols) == 4 and _is_int(cols[3])


def _is_run_line(text: str) -> bool:
    cols = text.split()
    return len(cols) >= 6 and _is_int(cols[3]) and _is_float(cols[4])


def _is_id_text_line(text: str) -> bool:
    cols = text.split("\t")
    return len(cols) == 2 and bool(cols[0].strip()) and not any(c.isspace() for c in cols[0].strip()) \
        and bool(cols[1].strip())


def _first_item(obj: Mapping[str, Any], key: str) -> Any:
    value = obj.get(key)
    return value[0] if isinstance(value, list) and value else None


def _format_of_object(obj: Any) -> str | None:
    """The format a file's first JSON record fits exactly (its identifying fields all present), or ``None``."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)

    def has(*names: str) -> bool:
        return all(name in keys for name in names)

    if has("conv_id", "conversation"):
        return "ultrachat"
    if has("query_id") and keys & {"query", "query_text"} and keys & {"positive_passages", "positive_document_ids"}:
        return "tevatron"
    if has("conv_id", "turns"):
        return "chatretriever-eval"
    if has("number") and keys & {"turns", "responses"}:
        turn = _first_item(obj, "responses" if "responses" in keys else "turns")
        if isinstance(turn, dict) and "turn_id" in turn and turn.keys() & {"utterance", "user_utterance"}:
            return "ikat"
        return None
    if has("number", "turn"):
        turn = _first_item(obj, "turn")
        if isinstance(turn, dict) and "raw_utterance" in turn:
            return "cast"
        if isinstance(turn, dict) and "participant" in turn:
            return "cast2022"
        if isinstance(turn, dict) and "utterance" in turn:
            return "cast2022-flat"
        return None
    if has("Conversation_no", "Turn_no", "Truth_rewrite"):
        return "scai-qrecc"
    if has("Conversation_no", "Question"):
        return "topiocqa" if keys & {"Gold_passage", "Topic", "Topic_section", "is_nq"} else "qrecc"
    if has("turn_id", "query", "context_qs"):
        return "convdr"
    if has("sample_id", "cur_utt_text"):
        return "t5qr"
    if has("_id", "text"):
        return "beir-corpus" if "title" in keys else "beir-queries"
    if has("pid", "passage"):
        return "msmarco-v2-passage"
    if has("docid", "segment"):
        return "msmarco-v2.1-segmented"
    if has("doc_id", "passage_id", "passage_text"):
        return "ikat-passages"
    if has("id", "contents"):
        return "pyserini"
    if keys & {"id", "docid"} and "text" in keys:
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
def _drive(path: PathLike, fmt: str, records: Iterable[tuple[int, Any]], parse: Callable[[Any], list | None],
           strict: bool, report: ReadReport | None) -> Iterator[Any]:
    report = report if report is not None else ReadReport()
    report.format, report.path = fmt, str(path)
    for line, obj in records:
        try:
            if isinstance(obj, _Bad):
                raise obj
            items = parse(obj)  # None: a header line, not a record
        except _Bad as bad:
            if strict:
                raise DataError(path, line, bad.reason) from None
            report.add_error(line, bad.reason)
            if bad.fatal:
                break
            continue
        if items is None:
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
            if i + 1 == len(parsed):
                break  # a conversation may end on a User turn: it has no answer to learn, the earlier turns do
            if parsed[i + 1][0] != ASSISTANT:
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
        raise _Bad("no User turn followed by an Assistant turn in 'conversation'")
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
    return [TrainingExample(qid, [], query, pos[0], neg, None, None)]


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
    parse = {"chatretriever-eval": _parse_chatretriever_eval, "cast": _parse_cast, "cast2022": _parse_cast2022_tree,
             "cast2022-flat": _cast2022_flat_parser(), "ikat": _parse_ikat, "convdr": _parse_convdr,
             "t5qr": _parse_t5qr, "scai-qrecc": _parse_scai_qrecc, "beir-queries": _parse_beir_query,
             }.get(fmt, _parse_qa_turn)
    if fmt == "tsv":
        return _drive(path, fmt, _iter_lines(path), _parse_query_tsv, strict, report)
    return _drive(path, fmt, iter_records(path), parse, strict, report)


def _parse_chatretriever_eval(obj: Any) -> list[EvalTurn]:
    conv_id = _ident(obj, "conv_id")
    turns = _field(obj, "turns", list)  # may be empty (LLM4CS's CAsT-21 files have such a conversation): no turn
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


def _str_list(obj: Any, key: str, where: str = "", allow_empty: bool = False) -> list[str]:
    """A list of texts (absent or null: empty); ``allow_empty``: empty strings are kept as ``""``."""
    values = _field(obj, key, list, where, optional=True) or []
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise _Bad(f"{key}[{j}]" + (f" in {where}" if where else "") + f" must be str, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise _Bad(f"empty text in {key}[{j}]" + (f" of {where}" if where else ""))
    return values


def _ikat_ptkb(obj: Any) -> list[str]:
    ptkb = obj.get("ptkb")
    if ptkb is None:
        return []
    if isinstance(ptkb, dict):  # 2023 / 2024: {"1": statement, ...}, in the order of the statement numbers
        keys = sorted(ptkb, key=lambda k: (0, int(k), "") if str(k).strip().isdigit() else (1, 0, str(k)))
        items = [(f"ptkb[{k!r}]", ptkb[k]) for k in keys]
    elif isinstance(ptkb, list):  # 2025: a list
        items = [(f"ptkb[{j}]", value) for j, value in enumerate(ptkb)]
    else:
        raise _Bad(f"field 'ptkb' must be an object or a list, got {type(ptkb).__name__}")
    for where, value in items:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"{where} must be a non-empty str")
    return [value for _, value in items]


def _parse_ikat(obj: Any) -> list[EvalTurn]:
    """TREC iKAT topics: 2023 / 2024 ``turns`` of ``utterance``, 2025 ``responses`` of ``user_utterance``."""
    conv_id = _ident(obj, "number")
    key, utterance_key = ("responses", "user_utterance") if "responses" in obj else ("turns", "utterance")
    turns = _field(obj, key, list)
    if not turns:
        raise _Bad(f"empty {key!r}")
    ptkb = _ikat_ptkb(obj)
    out: list[EvalTurn] = []
    history: list[Turn] = []
    seen = set()
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        turn_id = _ident(turn, "turn_id", where)
        if turn_id in seen:
            raise _Bad(f"duplicate turn_id {turn_id!r} in {where}")
        seen.add(turn_id)
        utterance = _text(turn, utterance_key, where)
        response = _text(turn, "response", where, optional=True)
        out.append(EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, list(history), utterance,
                            _text(turn, "resolved_utterance", where, optional=True), response, [], ptkb=list(ptkb)))
        history.append(Turn(USER, utterance))
        if response is not None:
            history.append(Turn(ASSISTANT, response))
    return out


def _parse_cast2022_tree(obj: Any) -> list[EvalTurn]:
    """CAsT 2022 tree topics: every turn names its ``parent``; a User turn's session is its ancestors."""
    conv_id = _ident(obj, "number")
    turns = _field(obj, "turn", list)
    if not turns:
        raise _Bad("empty 'turn'")
    nodes: dict[str, tuple[str, str, str | None, Any, str]] = {}
    for i, turn in enumerate(turns):
        where = f"turn[{i}]"
        number = _ident(turn, "number", where)
        if number in nodes:
            raise _Bad(f"duplicate turn number {number!r} in {where}")
        participant = _field(turn, "participant", str, where).lower()
        if participant == "user":
            role, text = USER, _text(turn, "utterance", where)
        elif participant == "system":
            role, text = ASSISTANT, _text(turn, "response", where)
        else:
            raise _Bad(f"unknown participant {turn['participant']!r} in {where} (expected 'User' or 'System')")
        parent = _field(turn, "parent", (str, int), where, optional=True)
        nodes[number] = (role, text, None if parent is None else str(parent), turn, where)
    answers: dict[str, str] = {}
    for number, (role, text, parent, _, where) in nodes.items():
        if parent is not None and parent not in nodes:
            raise _Bad(f"{where}: parent {parent!r} is not a turn of topic {conv_id}")
        if role == ASSISTANT and parent is not None:
            answers.setdefault(parent, text)
    out: list[EvalTurn] = []
    for number, (role, text, parent, turn, where) in nodes.items():
        if role != USER:
            continue
        chain, visited = [], {number}
        while parent is not None:
            if parent in visited:
                raise _Bad(f"{where}: its parent chain loops at {parent!r}")
            visited.add(parent)
            parent_role, parent_text, parent, _, _ = nodes[parent]
            chain.append(Turn(parent_role, parent_text))
        chain.reverse()
        out.append(EvalTurn(f"{conv_id}_{number}", conv_id, number, chain, text,
                            _text(turn, "manual_rewritten_utterance", where, optional=True), answers.get(number), []))
    if not out:
        raise _Bad("no User turn in 'turn'")
    return out


def _cast2022_flat_parser() -> Callable[[Any], list[EvalTurn]]:
    """CAsT 2022 flattened topics: one record per path of the tree, so a turn shared by several paths comes once
    per path (with the same session); each qid is yielded once, from the first path that holds it."""
    yielded: set[str] = set()

    def parse(obj: Any) -> list[EvalTurn]:
        conv_id = _ident(obj, "number")
        turns = _field(obj, "turn", list)
        if not turns:
            raise _Bad("empty 'turn'")
        out: list[EvalTurn] = []
        history: list[Turn] = []
        seen = set()
        for i, turn in enumerate(turns):
            where = f"turn[{i}]"
            number = _ident(turn, "number", where)
            if isinstance(turn, dict) and "participant" in turn:
                raise _Bad(f"{where} has a 'participant': this is a CAsT 2022 tree file (format 'cast2022')")
            if number in seen:
                raise _Bad(f"duplicate turn number {number!r} in {where}")
            seen.add(number)
            utterance = _text(turn, "utterance", where)
            response = _text(turn, "response", where, optional=True)
            qid = f"{conv_id}_{number}"
            if qid not in yielded:
                out.append(EvalTurn(qid, conv_id, number, list(history), utterance,
                                    _text(turn, "manual_rewritten_utterance", where, optional=True), response, []))
            history.append(Turn(USER, utterance))
            if response is not None:
                history.append(Turn(ASSISTANT, response))
        yielded.update(turn.qid for turn in out)
        return out

    return parse


def _split_turn_id(text: str, what: str) -> tuple[str, str]:
    conv_id, sep, turn_id = text.rpartition("_")
    if not sep or not conv_id or not turn_id:
        raise _Bad(f"{what} {text!r} is not '{{conversation}}_{{turn}}'")
    return conv_id, turn_id


def _parse_convdr(obj: Any) -> list[EvalTurn]:
    """ConvDR / COTED eval jsonl: ``turn_id`` is the qrels' qid; history = ``context_qs`` (+ the previous turn's
    ``last_manual_response``, CAsT-20)."""
    qid = _ident(obj, "turn_id")
    query = _text(obj, "query")
    conv_id, turn_id = obj.get("topic_number"), obj.get("query_number")
    if conv_id is None or turn_id is None:
        conv_id, turn_id = _split_turn_id(qid, "turn_id")
    else:
        conv_id, turn_id = _ident(obj, "topic_number"), _ident(obj, "query_number")
    history = [Turn(USER, text) for text in _str_list(obj, "context_qs")]
    last_response = _text(obj, "last_manual_response", optional=True)
    if last_response is not None and history:
        history.append(Turn(ASSISTANT, last_response))
    return [EvalTurn(qid, conv_id, turn_id, history, query, _text(obj, "oracle_query", optional=True), None, [])]


def _parse_t5qr(obj: Any) -> list[EvalTurn]:
    """T5QR / ConvGQR jsonl: ``sample_id`` ``{set}_{conv}_{turn}`` (``CAsT20-test_81_1``); the qid drops the set
    prefix (``81_1``, as the set's qrels spell it)."""
    sample_id = _ident(obj, "sample_id")
    parts = sample_id.rsplit("_", 2)
    if len(parts) < 2 or not all(parts):
        raise _Bad(f"sample_id {sample_id!r} is not '{{set}}_{{conversation}}_{{turn}}'")
    conv_id, turn_id = parts[-2], parts[-1]
    query = _text(obj, "cur_utt_text")
    utterances = _str_list(obj, "ctx_utts_text")
    responses = _str_list(obj, "ctx_resps_text", allow_empty=True)
    # responses pair with the latest utterances (T5QR writes [""] for a first turn; some files keep the last only)
    extra = len(responses) - len(utterances)
    if extra > 0:
        if any(r.strip() for r in responses[:extra]):
            raise _Bad(f"{len(responses)} ctx_resps_text for {len(utterances)} ctx_utts_text")
        responses = responses[extra:]
    offset = len(utterances) - len(responses)
    history: list[Turn] = []
    for j, utterance in enumerate(utterances):
        history.append(Turn(USER, utterance))
        if j >= offset and responses[j - offset].strip():
            history.append(Turn(ASSISTANT, responses[j - offset]))
    return [EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, history, query,
                     _text(obj, "oracle_utt_text", optional=True), None, [])]


def _parse_scai_qrecc(obj: Any) -> list[EvalTurn]:
    """SCAI-QReCC: ``Truth_rewrite``, ``Truth_answer``, ``Truth_passages`` (ids ``{URL}_p{N}``). Its ground-truth file
    has no question: the query is then the rewrite, with ``Question`` / ``Context`` used when present."""
    conv_id, turn_id = _ident(obj, "Conversation_no"), _ident(obj, "Turn_no")
    rewrite = _text(obj, "Truth_rewrite")
    question = _text(obj, "Question", optional=True)
    return [EvalTurn(f"{conv_id}_{turn_id}", conv_id, turn_id, _context_turns(obj), question or rewrite, rewrite,
                     _text(obj, "Truth_answer", optional=True), [],
                     positive_ids=list(_str_list(obj, "Truth_passages")))]


_MTRAG_SPEAKER = re.compile(r"\|(user|agent|assistant)\|: ?")


def _mtrag_turns(text: str) -> list[Turn] | None:
    """mt-rag's query text ``|user|: q1\n|user|: q2`` as turns (a line without a speaker continues the turn before);
    ``None`` when the text does not start with a speaker."""
    turns: list[list[str]] = []
    for line in text.split("\n"):
        match = _MTRAG_SPEAKER.match(line)
        if match:
            turns.append([USER if match.group(1) == "user" else ASSISTANT, line[match.end():]])
        elif turns:
            turns[-1][1] += "\n" + line
        else:
            return None
    return [Turn(role, body) for role, body in turns]


def _parse_query_tsv(line: str) -> list[EvalTurn]:
    """``qid<TAB>text``: a single-turn query (no history); ``{conv}_{turn}`` qids are split into their parts."""
    qid, sep, text = line.partition("\t")
    qid = qid.strip()
    if not sep:
        raise _Bad("expected 'qid<TAB>text'")
    if not qid:
        raise _Bad("empty qid")
    if not text.strip():
        raise _Bad("empty text")
    conv_id, sep, turn_id = qid.rpartition("_")
    if not sep or not conv_id or not turn_id:
        conv_id, turn_id = qid, ""
    return [EvalTurn(qid, conv_id, turn_id, [], text.strip())]


def _parse_beir_query(obj: Any) -> list[EvalTurn]:
    """BEIR queries ``{"_id", "text"}``: the qid is ``_id`` as is (mt-rag's ``{conversation}<::>{turn}`` too); an
    mt-rag text of ``|user|: ...`` lines is split into a session."""
    qid = _ident(obj, "_id")
    text = _text(obj, "text")
    conv_id, sep, turn_id = qid.rpartition("<::>")
    if not sep:
        conv_id, turn_id = qid, ""
    turns = _mtrag_turns(text)
    if turns is None:
        return [EvalTurn(qid, conv_id, turn_id, [], text)]
    if turns[-1].role != USER or not turns[-1].text.strip():
        raise _Bad("the last '|speaker|:' turn of 'text' is not a non-empty '|user|:' turn")
    if any(not turn.text.strip() for turn in turns):
        raise _Bad("an empty '|speaker|:' turn in 'text'")
    return [EvalTurn(qid, conv_id, turn_id, turns[:-1], turns[-1].text)]


# ------------------------------------------------------------------------------------------ collections
def read_collection(
    path: PathLike,
    format: str = "auto",
    strict: bool = False,
    report: ReadReport | None = None,
) -> Iterator[Passage]:
    """Passages of a collection, one at a time (constant memory: fine for millions of lines).

    Args:
        path: a collection in one of :data:`COLLECTION_FORMATS`: jsonl ``{"id", "text", "title"?}``, Tevatron corpus
            jsonl ``{"docid", "title", "text"}`` or TSV ``pid<TAB>text`` (``collection``; MS MARCO: the text is
            everything after the first tab), BEIR ``{"_id", "title", "text"}``, MS MARCO v2 passages ``{"pid",
            "passage"}``, MS MARCO v2.1 segmented documents ``{"docid", "title", "segment"}``, iKAT passages
            ``{"doc_id", "passage_id", "passage_text"}`` (id ``{doc_id}:{passage_id}``), pyserini ``{"id",
            "contents"}``, DPR / TopiOCQA TSV ``id<TAB>text<TAB>title`` with its header.
        format: ``"auto"`` or one of :data:`COLLECTION_FORMATS`.
        strict, report: as in :func:`read_training`.

    For multi-process encoding of a large collection, :func:`convret.data.arrow.load_collection` gives a
    memory-mapped Hugging Face ``datasets.Dataset`` sharded by rank.
    """
    fmt = _resolve(path, format, COLLECTION_FORMATS, "passages")
    if fmt == "dpr-tsv":
        return _drive(path, fmt, _iter_quoted_tsv(path), _dpr_parser(), strict, report)
    if fmt == "tsv" or (fmt == "collection" and _first_char(path) not in "[{"):
        return _drive(path, fmt, _iter_lines(path), _parse_passage_tsv, strict, report)
    return _drive(path, fmt, iter_records(path), _PASSAGE_PARSERS[fmt], strict, report)


def _parse_passage_json(obj: Any) -> list[Passage]:
    return [_passage_obj(obj, "record", id_keys=("id", "docid", "_id", "pid"))]


def _passage_parser(id_key: str, text_key: str, title_key: str | None = None) -> Callable[[Any], list[Passage]]:
    def parse(obj: Any) -> list[Passage]:
        title = _field(obj, title_key, str, optional=True) if title_key else None
        return [Passage(_ident(obj, id_key), _text(obj, text_key), title or "")]

    return parse


def _parse_ikat_passage(obj: Any) -> list[Passage]:
    docid, passage_id = _ident(obj, "doc_id"), _ident(obj, "passage_id")
    return [Passage(f"{docid}:{passage_id}", _text(obj, "passage_text"))]


_PASSAGE_PARSERS: dict[str, Callable[[Any], list[Passage]]] = {
    "collection": _parse_passage_json,
    "beir-corpus": _passage_parser("_id", "text", "title"),
    "msmarco-v2-passage": _passage_parser("pid", "passage"),
    "msmarco-v2.1-segmented": _passage_parser("docid", "segment", "title"),
    "ikat-passages": _parse_ikat_passage,
    "pyserini": _passage_parser("id", "contents"),
}


def _dpr_parser() -> Callable[[Any], list[Passage]]:
    """Rows of a DPR TSV; the header (first row ``id<TAB>text<TAB>title``) is no passage and sets the columns."""
    columns = {name: j for j, name in enumerate(_DPR_HEADER)}
    state = {"first": True}

    def parse(fields: list[str]) -> list[Passage] | None:
        if state["first"]:
            state["first"] = False
            names = [f.strip().lower() for f in fields]
            if sorted(names) == sorted(_DPR_HEADER):
                columns.update({name: j for j, name in enumerate(names)})
                return None
        if len(fields) != len(_DPR_HEADER):
            raise _Bad(f"expected 3 tab-separated fields 'id<TAB>text<TAB>title', got {len(fields)}")
        pid, text, title = (fields[columns[name]] for name in _DPR_HEADER)
        if not pid.strip():
            raise _Bad("empty id")
        if not text.strip():
            raise _Bad("empty text")
        return [Passage(pid.strip(), text, title)]

    return parse


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
def read_qrels(path: PathLike, strict: bool = False, report: ReadReport | None = None,
               format: str = "auto") -> dict[str, dict[str, int]]:
    """Relevance judgements -> ``{qid: {docid: rel}}``.

    Formats: ``qrels``, TREC ``qid 0 docid rel`` (whitespace-separated, rel an integer grade; lines starting with
    ``#`` are comments, as in trec_eval); ``beir-qrels``, BEIR's TSV ``query-id<TAB>corpus-id<TAB>score`` after that
    header line. ``"auto"``: ``beir-qrels`` when the first line is BEIR's header, else ``qrels``.
    A docid listed twice for one query is a bad line (the first grade is kept)."""
    path = _existing(path)
    if format == "auto":
        lines = list(itertools.islice(_iter_lines(path), 1))
        is_beir = bool(lines) and tuple(c.strip() for c in lines[0][1].split("\t")) == _BEIR_QRELS_HEADER
        format = "beir-qrels" if is_beir else "qrels"
    if format not in QRELS_FORMATS:
        raise DataError(path, 0, f"format {format!r} holds no qrels (readable formats: {', '.join(QRELS_FORMATS)})")
    qrels: dict[str, dict[str, int]] = {}
    beir = format == "beir-qrels"
    state = {"first": True}

    def parse(line: str) -> list | None:
        if beir:
            first, state["first"] = state["first"], False
            cols = [c.strip() for c in line.split("\t")]
            if first and tuple(cols) == _BEIR_QRELS_HEADER:
                return None
            if len(cols) != 3:
                raise _Bad(f"expected 3 tab-separated columns 'query-id<TAB>corpus-id<TAB>score', got {len(cols)}")
            qid, docid, rel = cols
        else:
            cols = line.split()
            if len(cols) != 4:
                raise _Bad(f"expected 4 columns 'qid 0 docid rel', got {len(cols)}")
            qid, _, docid, rel = cols
        if not qid or not docid:
            raise _Bad("empty query or document id")
        if not _is_int(rel):
            raise _Bad(f"relevance {rel!r} is not an integer")
        if docid in qrels.get(qid, {}):
            raise _Bad(f"duplicate judgement of {docid!r} for query {qid!r}")
        qrels.setdefault(qid, {})[docid] = int(rel)
        return [None]

    for _ in _drive(path, format, _iter_lines(path, comments=not beir), parse, strict, report):
        pass
    return qrels


def read_run(path: PathLike, strict: bool = False, report: ReadReport | None = None) -> dict[str, dict[str, float]]:
    """TREC run ``qid Q0 docid rank score tag`` -> ``{qid: {docid: score}}`` (ranks are checked to be integers;
    evaluation orders by score, as trec_eval does). As in trec_eval, fields after the tag are ignored and lines
    starting with ``#`` are comments."""
    run: dict[str, dict[str, float]] = {}

    def parse(line: str) -> list:
        cols = line.split()
        if len(cols) < 6:
            raise _Bad(f"expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
        qid, _, docid, rank, score = cols[:5]
        if not _is_int(rank):
            raise _Bad(f"rank {rank!r} is not an integer")
        if not _is_float(score):
            raise _Bad(f"score {score!r} is not a finite number")
        if docid in run.get(qid, {}):
            raise _Bad(f"docid {docid!r} listed twice for query {qid!r}")
        run.setdefault(qid, {})[docid] = float(score)
        return [None]

    for _ in _drive(path, "run", _iter_lines(_existing(path), comments=True), parse, strict, report):
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
