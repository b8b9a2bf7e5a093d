"""Fail when a convret / peer speed-up measured in one micro-benchmark run dropped in the next one.

Absolute times on a shared machine move with the load of other jobs; a speed-up over a peer measured seconds
apart in the same process (``extra_info["speedup"]``, written by bench/micro) moves much less. This script
compares those in-run ratios between two saved pytest-benchmark JSON files: for every convret benchmark and
every peer present in both, ``drop = 1 - current_ratio / baseline_ratio``; a drop above ``--max-drop`` percent
is a regression.

    python bench/micro/compare_ratios.py                          # the two latest runs under .benchmarks/
    python bench/micro/compare_ratios.py --max-drop 30 BASE.json NEW.json

Exit status: 0 no regression, 1 at least one ratio dropped past the threshold, 2 nothing to compare (fewer
than two runs, no shared ratio, unreadable file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_STORAGE = ".benchmarks"
DEFAULT_MAX_DROP = 25.0


class CompareError(Exception):
    """Nothing meaningful to compare (exit status 2)."""


def load_run(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: cannot read a pytest-benchmark JSON file ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise CompareError(f"{path}: no 'benchmarks' list, not a pytest-benchmark JSON file")
    return data


def latest_runs(storage: Path, count: int = 2) -> list[Path]:
    """The ``count`` most recent saved runs under ``storage`` (any machine folder), oldest first, ordered by the
    ``datetime`` pytest-benchmark writes into each file."""
    files = sorted(storage.rglob("*.json")) if storage.is_dir() else []
    dated = []
    for path in files:
        try:
            dated.append((str(load_run(path).get("datetime", "")), path))
        except CompareError:
            continue
    if len(dated) < count:
        raise CompareError(f"need {count} saved runs under {storage}/, found {len(dated)} (run `make bench-micro`)")
    return [path for _, path in sorted(dated)[-count:]]


def ratios(run: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(benchmark fullname, peer) -> speed-up, for the non-smoke convret entries of one run."""
    found = {}
    for bench in run["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("smoke"):
            continue
        for peer, ratio in (info.get("speedup") or {}).items():
            found[(bench["fullname"], peer)] = float(ratio)
    return found


def compare(baseline: dict[str, Any], current: dict[str, Any], max_drop: float) -> tuple[list[str], list[str]]:
    """Return (report lines, regression lines). ``max_drop`` is a percentage."""
    base, cur = ratios(baseline), ratios(current)
    shared = sorted(set(base) & set(cur))
    if not shared:
        raise CompareError("the two runs share no convret / peer speed-up (different selections, or smoke runs?)")
    lines = [f"{'benchmark':<72} {'peer':<14} {'base':>7} {'now':>7} {'change':>8}"]
    regressions = []
    for key in shared:
        name, peer = key
        drop = 100.0 * (1.0 - cur[key] / base[key])
        flag = ""
        if drop > max_drop:
            flag = f"  REGRESSION (dropped {drop:.1f}% > {max_drop:g}%)"
            regressions.append(f"{name} vs {peer}: {base[key]:.2f}x -> {cur[key]:.2f}x")
        lines.append(f"{name:<72} {peer:<14} {base[key]:>6.2f}x {cur[key]:>6.2f}x {-drop:>+7.1f}%{flag}")
    for key in sorted(set(base) - set(cur)):
        lines.append(f"{key[0]} vs {key[1]}: in the baseline only (not measured now)")
    for key in sorted(set(cur) - set(base)):
        lines.append(f"{key[0]} vs {key[1]}: new in this run (no baseline)")
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare the in-run convret/peer speed-ups of two saved micro-benchmark runs "
                    "(pytest-benchmark JSON) and fail when one dropped by more than --max-drop percent.")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN.json",
                        help="baseline and current JSON files; default: the two latest runs under --storage")
    parser.add_argument("--storage", type=Path, default=Path(DEFAULT_STORAGE),
                        help=f"pytest-benchmark storage folder (default {DEFAULT_STORAGE})")
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                        help=f"largest tolerated drop of a speed-up, in percent (default {DEFAULT_MAX_DROP:g})")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 2:
            paths = args.runs
        elif not args.runs:
            paths = latest_runs(args.storage)
        else:
            parser.error("give two JSON files (baseline, current) or none")
        baseline, current = (load_run(path) for path in paths)
        lines, regressions = compare(baseline, current, args.max_drop)
    except CompareError as error:
        print(f"compare_ratios: {error}", file=sys.stderr)
        return 2
    print(f"in-run speed-ups: baseline {paths[0]}\n                  current  {paths[1]}")
    print("\n".join(lines))
    if regressions:
        print(f"\n{len(regressions)} speed-up(s) dropped by more than {args.max_drop:g}%:")
        print("\n".join(f"  {line}" for line in regressions))
        return 1
    print(f"\nno speed-up dropped by more than {args.max_drop:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
