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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .._io import atomic_write
from ._parsing import PathLike, _Bad, _context_turns, _field, _ident, _open, _passage_obj, _text, _unique_turns
from .conversations import (_cast2022_flat_parser, _parse_beir_query, _parse_cast2022_tree, _parse_convdr, _parse_ikat,
                            _parse_query_tsv, _parse_scai_qrecc, _parse_t5qr)
from .passages import _DPR_HEADER, _PASSAGE_PARSERS, _dpr_parser, _iter_quoted_tsv, _parse_passage_tsv
from .records import ASSISTANT, USER, EvalTurn, Passage, TrainingExample, Turn

__all__ = [
    "DataError", "ReadReport", "MAX_REPORTED_ERRORS", "FORMATS", "TRAINING_FORMATS", "CONVERSATION_FORMATS",
    "COLLECTION_FORMATS", "QRELS_FORMATS",
    "detect_format", "read_training", "read_conversations", "read_collection", "read_qrels", "read_run",
    "write_run", "write_qrels", "iter_records", "readable_formats",
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

class DataError(ValueError):
    """A malformed record: ``str()`` is ``"{path}:{line}: {reason}"``, or ``"{path}: {reason}"`` for an error
    of the whole file (``line`` 0: missing, empty, unknown format)."""

    def __init__(self, path: PathLike, line: int, reason: str):
        self.path = str(path)
        self.line = int(line)
        self.reason = reason
        super().__init__(f"{self.path}:{self.line}: {reason}" if self.line > 0 else f"{self.path}: {reason}")


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
        line: the line of the record whose items are being yielded (while iterating).
    """

    format: str = ""
    path: str = ""
    records: int = 0
    skipped: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    items: int = 0
    line: int = 0

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


# ------------------------------------------------------------------------------------------ raw records
# ``strict=False``: a raw control character (a tab, a bare carriage return) inside a JSON string is read as itself
# instead of making the record invalid; writers outside Python leave them unescaped now and then.
_DECODER = json.JSONDecoder(strict=False)


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


def _is_multiline_object(path: PathLike, limit: int = 1 << 20) -> bool:
    """Whether the file starts with one JSON object spread over several lines: it parses within its first ``limit``
    characters and holds a line break, or it opens with a line that is just ``{`` (a longer pretty-printed object).
    A truncated one-line record is not one (it fails to parse before the next line's record)."""
    with _open(path) as handle:
        text = handle.read(limit).lstrip("\ufeff \t\r\n")
    if text.split("\n", 1)[0].strip() == "{":
        return True
    try:
        _, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return False
    return "\n" in text[:end]


def _iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    first = True
    for number, line in _iter_lines(path):
        try:
            value, end = _DECODER.raw_decode(line, len(line) - len(line.lstrip()))
            if line[end:].strip():
                raise json.JSONDecodeError("Extra data", line, end)
            yield number, value
        except json.JSONDecodeError as error:
            if first and line.lstrip().startswith("{") and _is_multiline_object(path):
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


# ------------------------------------------------------------------------------------------ format detection
_DETECT_LINES = 20  # text files: the leading lines a layout must fit (the first one and 3 in 4)


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
                                            f"format exactly; {_format_advice(path)}")
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
    raise DataError(path, lines[0][0], "cannot detect the format of this text file: its first lines fit neither "
                                       "TREC qrels ('qid 0 docid rel'), a TREC run ('qid Q0 docid rank score tag'), "
                                       "an 'id<TAB>text' TSV, nor a BEIR qrels or DPR TSV header; "
                                       + _format_advice(path))


_BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")


def readable_formats(path: PathLike, records: int = _DETECT_LINES) -> list[str]:
    """The formats whose reader reads the first ``records`` records of ``path`` without a bad one (what a file
    that detection cannot place could be read as with ``format=``)."""
    readers: dict[str, Callable[[PathLike, str], Iterable[Any]]] = {}
    for fmt in TRAINING_FORMATS:
        readers.setdefault(fmt, lambda p, f: read_training(p, f, strict=True))
    for fmt in CONVERSATION_FORMATS:
        readers.setdefault(fmt, lambda p, f: read_conversations(p, f, strict=True))
    for fmt in COLLECTION_FORMATS:
        readers.setdefault(fmt, lambda p, f: read_collection(p, f, strict=True))
    found = []
    for fmt in FORMATS:
        try:
            if fmt in readers:
                ok = any(True for _ in itertools.islice(readers[fmt](path, fmt), records))
            else:  # qrels / run: whole-file readers; their line shape decides
                fits = {"qrels": _is_qrels_line, "run": _is_run_line}.get(fmt)
                lines = [text for _, text in itertools.islice(_iter_lines(path), records)
                         if not text.lstrip().startswith("#")]
                ok = fits is not None and bool(lines) and all(map(fits, lines))
        except Exception:  # noqa: BLE001  (any failure of a reader means: this format cannot read the file)
            ok = False
        if ok:
            found.append(fmt)
    return found


def _format_advice(path: PathLike) -> str:
    """What to do about a file detection could not place: the formats that can read it, or that none can."""
    try:
        formats = readable_formats(path)
    except OSError:
        formats = []
    if formats:
        return f"pass format=... (--format): {', '.join(formats)} can read its first records"
    return ("no format convret reads fits it (the formats, with an example of each: docs/data.md); convert it to "
            "one of them")


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
        report.line = line
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
    return [TrainingExample(qid, [], query, pos[0], neg, None, None, positives=pos if len(pos) > 1 else [])]


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
    for where, turn, turn_id in _unique_turns(turns, "turns"):
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
