"""``convret data check FILE``: validate a data file before anyone spends GPU hours on it."""
from __future__ import annotations

import argparse
import json
import sys

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
    ``strict`` it holds the counts up to the bad record when :class:`DataError` is raised)."""
    fmt = detect_format(path) if format == "auto" else format
    report = report if report is not None else ReadReport()
    report.format, report.path = fmt, str(path)
    if fmt in QRELS_FORMATS:
        read_qrels(path, strict=strict, report=report, format=fmt)
    elif fmt == "run":
        read_run(path, strict=strict, report=report)
    elif fmt in COLLECTION_FORMATS:  # ``tsv`` (id<TAB>text) is checked as a collection; it reads as queries too
        for _ in read_collection(path, fmt, strict=strict, report=report):
            pass
    elif fmt in CONVERSATION_FORMATS:
        for _ in read_conversations(path, fmt, strict=strict, report=report):
            pass
    else:
        for _ in read_training(path, fmt, corpus=corpus, strict=strict, report=report):
            pass
    return report


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
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
