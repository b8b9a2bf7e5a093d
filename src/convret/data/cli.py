"""``convret data check FILE``: validate a data file before anyone spends GPU hours on it."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from array import array
from typing import Callable, Iterable, Iterator

from .._args import parse
from .readers import (COLLECTION_FORMATS, CONVERSATION_FORMATS, FORMATS, MAX_REPORTED_ERRORS, QRELS_FORMATS, DataError,
                      ReadReport, detect_format, read_collection, read_conversations, read_qrels, read_run,
                      read_training)

DESCRIPTION = f"""\
Validate a data file: read every record, report each malformed one with its line and reason.

Exit status: 0 when every record is good, 1 when some were skipped (or --strict stopped at one), 2 when the
file cannot be read at all (missing, empty, unknown format).

With --json, prints exactly one JSON object:
  {{"format": ..., "records": N_good, "skipped": N_bad, "errors": [{{"line": k, "reason": "..."}}, ...]}}
"records" and "skipped" count every record exactly; "errors" lists the first {MAX_REPORTED_ERRORS}. A record is
a line of a jsonl / TSV / TREC file or an element of a JSON array (a conversation, topic or turn).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convret data", description="Data-file tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a data file", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("file", help="the file to check")
    check.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                       help="the file's format (default: detected from its first record or lines; a file that fits "
                            "no format exactly is an error that asks for this option). Names: docs/data.md")
    check.add_argument("--corpus", default=None,
                       help="for Tevatron's new schema: the collection its document ids must resolve in")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--strict", action="store_true", help="stop at the first bad record (exit status 1)")
    return parser


def check_file(path: str, format: str = "auto", corpus: str | None = None, strict: bool = False,
               report: ReadReport | None = None) -> ReadReport:
    """Read every record of ``path`` and return the :class:`ReadReport` (``report`` when given: with
    ``strict`` it holds the counts up to the bad record when :class:`DataError` is raised).

    A collection's passage ids and a conversation file's query ids must be unique (``convret encode`` refuses
    duplicates): every repeat is a bad record, reported at its line with the line of the first occurrence."""
    fmt = detect_format(path) if format == "auto" else format
    report = report if report is not None else ReadReport()
    report.format, report.path = fmt, str(path)
    if fmt in QRELS_FORMATS:
        read_qrels(path, strict=strict, report=report, format=fmt)
    elif fmt == "run":
        read_run(path, strict=strict, report=report)
    elif fmt in COLLECTION_FORMATS or fmt in CONVERSATION_FORMATS:
        # ``tsv`` (id<TAB>text) is checked as a collection; it reads as queries too
        passages = fmt in COLLECTION_FORMATS
        read = read_collection if passages else read_conversations

        def ids(into: ReadReport) -> Iterator[tuple[str, int]]:
            for item in read(path, fmt, strict=strict, report=into):
                yield (item.id if passages else item.qid), into.line

        ledger = _IdLedger()
        for ident, _ in ids(report):
            ledger.add(ident)
        what = "" if fmt == "tsv" else "passage " if passages else "query "
        for ident, first, line in ledger.duplicates(lambda: ids(ReadReport())):
            reason = f"duplicate {what}id {ident!r} (first at line {first}): ids must be unique"
            if strict:
                raise DataError(path, line, reason)
            report.records -= 1
            report.add_error(line, reason)
        report.errors.sort()
    else:
        for _ in read_training(path, fmt, corpus=corpus, strict=strict, report=report):
            pass
    return report


class _IdLedger:
    """The ids of a file as 64-bit hashes (8 bytes an id, not the ids themselves: a 38 M-passage collection
    costs about 300 MB). Hashes that repeat are confirmed on the ids by a second pass."""

    def __init__(self) -> None:
        self.hashes: array = array("Q")

    @staticmethod
    def _hash(ident: str) -> int:
        return int.from_bytes(hashlib.blake2b(ident.encode("utf-8"), digest_size=8).digest(), "little")

    def add(self, ident: str) -> None:
        self.hashes.append(self._hash(ident))

    def duplicates(self, reread: Callable[[], Iterable[tuple[str, int]]]) -> list[tuple[str, int, int]]:
        """``(id, line of its first occurrence, line of a repeat)`` of every repeat, in file order."""
        import numpy as np

        hashes = np.frombuffer(self.hashes, dtype=np.uint64) if len(self.hashes) else np.zeros(0, np.uint64)
        ordered = np.sort(hashes)
        suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not suspects:
            return []
        first: dict[str, int] = {}
        out = []
        for ident, line in reread():
            if self._hash(ident) in suspects:
                if ident in first:
                    out.append((ident, first[ident], line))
                else:
                    first[ident] = line
        return out


def main(argv: list[str]) -> int:
    args = parse(_parser(), argv)
    import logging

    logging.getLogger("convret.data").setLevel(logging.ERROR)  # the report below says it all, once
    report = ReadReport()
    try:
        check_file(args.file, args.format, args.corpus, args.strict, report)
    except DataError as error:
        if args.strict and report.format:
            report.skipped, report.errors = 1, [(error.line, error.reason)]
            if args.json:
                print(json.dumps(report.to_json()))
            else:
                print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"convret data check: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, UnicodeDecodeError) as error:
        print(f"convret data check: {args.file}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for line, reason in report.errors:
            print(f"{report.path}:{line}: {reason}")
        print(report.summary())
    return 1 if report.skipped else 0
