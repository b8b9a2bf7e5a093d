"""Command-line parsing shared by every command.

- No abbreviations: ``--max_step 2`` is an unknown option, never ``--max_steps`` (argparse's ``allow_abbrev``
  would silently expand it; a later option sharing the prefix would change what it means).
- Unknown options are named first, before any missing required one, each with its closest valid name
  (``unknown option --colection (did you mean --collection?)``), not a list of every valid name.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable, Sequence

__all__ = ["parse", "did_you_mean", "unknown_options", "known_options"]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean X?)"`` with the closest of ``candidates`` (options or keys), or ``""`` when none is
    close."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    if not matches and len(name.lstrip("-")) >= 3:  # a prefix typed short: --max_st for --max_steps
        matches = sorted((c for c in candidates if c.startswith(name)), key=len)[:1]
    return f" (did you mean {matches[0]}?)" if matches else ""


def known_options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of ``parser`` and of its subcommands' parsers."""
    known = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known |= known_options(sub)
    return known


def unknown_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The ``--name`` tokens of ``argv`` (``--name=value`` included, up to a ``--`` terminator) that
    ``parser`` does not define."""
    known = known_options(parser)
    out = []
    for token in argv:
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            if name not in known and name not in out:
                out.append(name)
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` without abbreviations, unknown options reported first (exit status 2)."""
    parser.allow_abbrev = False
    unknown = unknown_options(parser, argv)
    if unknown:
        known = sorted(known_options(parser))
        parser.error("; ".join(f"unknown option {name}{did_you_mean(name, known)}" for name in unknown))
    return parser.parse_args(list(argv))
