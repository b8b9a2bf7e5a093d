"""Parsers of the collection formats: jsonl / JSON-array passages of each layout (BEIR, MS MARCO v2 / v2.1, iKAT,
pyserini, convret's own), ``pid<TAB>text`` TSV and DPR's ``csv``-quoted TSV with its header;
:func:`convret.data.readers.read_collection` drives them (docs/data.md has the formats)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from ._parsing import PathLike, _Bad, _field, _ident, _open, _passage_obj, _text
from .records import Passage

_DPR_HEADER = ("id", "text", "title")


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
