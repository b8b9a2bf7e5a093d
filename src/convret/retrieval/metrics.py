"""``convret eval``: the field's retrieval metrics of a TREC run through pytrec_eval, with trec_eval ``-c``.

Measures (pytrec_eval names): ``ndcg_cut_3``, ``ndcg_cut_10`` (graded qrels: the grade is the gain),
``recip_rank`` (MRR over the whole run), ``recip_rank_cut_10`` (MRR@10: ``recip_rank`` of the run cut at its
10 best-scored passages; pytrec_eval's ``recip_rank`` has no cut-off), ``map``, ``recall_5``, ``recall_10``,
``recall_20``, ``recall_100``, ``recall_1000`` (binary: relevant iff ``rel >= rel_threshold``, trec_eval ``-l``).

Averaging (each measure over its own set of queries of the qrels):

- nDCG: every *graded* query, one with at least one passage of grade >= 1, whatever ``rel_threshold`` (the
  threshold only makes grades binary, as trec_eval's ``-l``; nDCG uses the grades themselves);
- the binary measures: every query with at least one relevant passage (``rel >= rel_threshold``); a query whose
  best grade is below the threshold has nothing to find and is left out of them (not counted as 0).

A query of a set without results in the run counts 0 (trec_eval ``-c``; pytrec_eval alone would leave it out).
Run queries without qrels are ignored. Every count is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any, Mapping

from .._io import atomic_write
from . import _data

__all__ = ["MEASURES", "evaluate_run", "doc_max_aggregate", "format_measures", "main"]

MEASURES = ["ndcg_cut_3", "ndcg_cut_10", "recip_rank", "recip_rank_cut_10", "map", "recall_5", "recall_10",
            "recall_20", "recall_100", "recall_1000"]
_PASSAGE_SUFFIX = re.compile(r"^(.*)-(\d+)$")


def doc_max_aggregate(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Document-level run from a passage-level one (CAsT): passage ids ``docid-N`` become ``docid`` scored by
    the maximum of their passages' scores. Ids without a ``-N`` suffix are kept as they are."""
    out: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        agg: dict[str, float] = {}
        for pid, score in docs.items():
            match = _PASSAGE_SUFFIX.match(pid)
            doc = match.group(1) if match else pid
            if doc not in agg or score > agg[doc]:
                agg[doc] = score
        out[qid] = agg
    return out


def _cut(run: Mapping[str, Mapping[str, float]], k: int) -> dict[str, dict[str, float]]:
    # the same order trec_eval ranks by: score descending, then docid descending
    return {q: dict(sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]) for q, d in run.items()}


def evaluate_run(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                 rel_threshold: int = 1) -> dict[str, Any]:
    """Metrics of ``run`` against ``qrels`` (module docstring: which queries each measure averages over).

    Returns:
        ``{"measures": {name: mean}, "per_query": {qid: {name: value}} (graded queries; the binary measures only
        for queries with a relevant passage), "queries": N (queries with a relevant passage: the binary
        measures' count), "graded_queries": M (nDCG's count), "missing": [graded qids without results],
        "ignored": number of run queries without qrels, "rel_threshold": R}``.

    Raises:
        ValueError: ``rel_threshold < 1``, no query with a relevant passage, or no query in common between qrels
        and run.
    """
    import pytrec_eval

    if rel_threshold < 1:
        raise ValueError(f"rel_threshold must be >= 1 (grade 0 is judged non-relevant), got {rel_threshold}")
    graded_qrels = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()
                    if any(int(r) >= 1 for r in docs.values())}
    relevant = [q for q, docs in graded_qrels.items() if any(r >= rel_threshold for r in docs.values())]
    if not relevant:
        raise ValueError(f"the qrels hold no passage with rel >= {rel_threshold}")
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    common = [q for q in graded_qrels if run.get(q)]
    if not common:
        raise ValueError(f"qrels and run have no query in common (qrels e.g. {sorted(graded_qrels)[:3]}, run e.g. "
                         f"{sorted(run)[:3]}): the run is not for these qrels")
    graded = pytrec_eval.RelevanceEvaluator(graded_qrels, {"ndcg_cut.3,10"})
    binary_qrels = {q: graded_qrels[q] for q in relevant}
    binary = pytrec_eval.RelevanceEvaluator(binary_qrels, {"recip_rank", "map", "recall.5,10,20,100,1000"},
                                            relevance_level=rel_threshold)
    cut10 = pytrec_eval.RelevanceEvaluator(binary_qrels, {"recip_rank"}, relevance_level=rel_threshold)
    present = {q: run[q] for q in common}
    binary_measures = [m for m in MEASURES if not m.startswith("ndcg")]
    per_query: dict[str, dict[str, float]] = {q: {m: 0.0 for m in MEASURES if m.startswith("ndcg")}
                                              for q in graded_qrels}
    for q in relevant:
        per_query[q].update({m: 0.0 for m in binary_measures})
    for q, values in graded.evaluate(present).items():
        per_query[q].update({m: values[m] for m in ("ndcg_cut_3", "ndcg_cut_10")})
    present_binary = {q: docs for q, docs in present.items() if q in binary_qrels}
    for q, values in binary.evaluate(present_binary).items():
        per_query[q].update({m: values[m] for m in ("recip_rank", "map", "recall_5", "recall_10", "recall_20",
                                                    "recall_100", "recall_1000")})
    for q, values in cut10.evaluate(_cut(present_binary, 10)).items():
        per_query[q]["recip_rank_cut_10"] = values["recip_rank"]
    measures = {}
    for m in MEASURES:
        over = graded_qrels if m.startswith("ndcg") else relevant
        measures[m] = math.fsum(per_query[q][m] for q in over) / len(over)
    return {"measures": measures, "per_query": per_query, "queries": len(relevant),
            "graded_queries": len(graded_qrels), "missing": sorted(set(graded_qrels) - set(common)),
            "ignored": len(set(run) - set(graded_qrels)), "rel_threshold": rel_threshold}


def format_measures(result: Mapping[str, Any]) -> str:
    lines = [f"{m:<18} {result['measures'][m]:.4f}" for m in MEASURES]
    graded = result.get("graded_queries", result["queries"])
    lines.append(f"{'queries':<18} nDCG over {graded} (every query with a passage of grade >= 1), the binary "
                 f"measures over {result['queries']} (a passage at rel >= {result['rel_threshold']}); "
                 f"{len(result['missing'])} without results count 0, as trec_eval -c")
    if result.get("ignored"):
        lines.append(f"{'ignored':<18} {result['ignored']} run queries without qrels")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret eval",
        description="Evaluate a TREC run against TREC qrels with pytrec_eval: NDCG@3, NDCG@10 (graded, over "
                    "every query with a passage of grade >= 1), MRR, MRR@10 (run cut at 10), MAP, "
                    "Recall@5/10/20/100/1000 (binary at rel >= R, over the queries with such a passage). A query "
                    "with qrels but no results counts 0 (trec_eval -c).")
    p.add_argument("--qrels", required=True, help="TREC qrels: qid 0 docid rel")
    p.add_argument("--run", required=True, help="TREC run: qid Q0 docid rank score tag")
    p.add_argument("--rel_threshold", "--rel-threshold", type=int, default=1,
                   help="binary relevance threshold of MRR, MAP and recall, as trec_eval -l (CAsT-21 uses 2; "
                        "default 1); nDCG always uses the grades")
    p.add_argument("--json", default=None, help="also write {measures, per_query, queries} to this file")
    p.add_argument("--doc-max-aggregate", action="store_true",
                   help="passage ids docid-N: score each document by its best passage (CAsT)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        qrels = _data.load_qrels(args.qrels)
        run = _data.load_run(args.run)
        if args.doc_max_aggregate:
            run = doc_max_aggregate(run)
        result = evaluate_run(qrels, run, args.rel_threshold)
    except (ValueError, OSError) as error:
        print(f"convret eval: error: {error}", file=sys.stderr)
        return 1
    print(format_measures(result))
    if args.json:
        with atomic_write(args.json) as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
            handle.write("\n")
    return 0
