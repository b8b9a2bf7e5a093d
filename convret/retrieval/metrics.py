"""``convret eval``: the field's retrieval metrics of a TREC run through pytrec_eval, with trec_eval ``-c``.

Measures (pytrec_eval names): ``ndcg_cut_3``, ``ndcg_cut_10`` (graded qrels: the grade is the gain),
``recip_rank`` (MRR over the whole run), ``recip_rank_cut_10`` (MRR@10: ``recip_rank`` of the run cut at its
10 best-scored passages; pytrec_eval's ``recip_rank`` has no cut-off), ``map``, ``recall_5``, ``recall_10``,
``recall_20``, ``recall_100``, ``recall_1000`` (binary: relevant iff ``rel >= rel_threshold``).

Averaging: over every query of the qrels that has at least one relevant passage (``rel >= rel_threshold``); a
such query without results in the run counts 0 for every measure (trec_eval ``-c``; pytrec_eval alone would
leave it out). Run queries without qrels are ignored. Both counts are reported.
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
    """Metrics of ``run`` against ``qrels``.

    Returns:
        ``{"measures": {name: mean}, "per_query": {qid: {name: value}}, "queries": N, "missing": [qids with
        qrels but no results], "ignored": number of run queries without qrels, "rel_threshold": R}``.

    Raises:
        ValueError: no query with a relevant passage, or no query in common between qrels and run.
    """
    import pytrec_eval

    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()
              if any(int(r) >= rel_threshold for r in docs.values())}
    if not judged:
        raise ValueError(f"the qrels hold no passage with rel >= {rel_threshold}")
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    common = [q for q in judged if run.get(q)]
    if not common:
        raise ValueError(f"qrels and run have no query in common (qrels e.g. {sorted(judged)[:3]}, run e.g. "
                         f"{sorted(run)[:3]}): the run is not for these qrels")
    graded = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.3,10"})
    binary = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank", "map", "recall.5,10,20,100,1000"},
                                            relevance_level=rel_threshold)
    cut10 = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}, relevance_level=rel_threshold)
    present = {q: run[q] for q in common}
    per_query: dict[str, dict[str, float]] = {q: {m: 0.0 for m in MEASURES} for q in judged}
    for q, values in graded.evaluate(present).items():
        per_query[q].update({m: values[m] for m in ("ndcg_cut_3", "ndcg_cut_10")})
    for q, values in binary.evaluate(present).items():
        per_query[q].update({m: values[m] for m in ("recip_rank", "map", "recall_5", "recall_10", "recall_20",
                                                    "recall_100", "recall_1000")})
    for q, values in cut10.evaluate(_cut(present, 10)).items():
        per_query[q]["recip_rank_cut_10"] = values["recip_rank"]
    n = len(per_query)
    measures = {m: math.fsum(v[m] for v in per_query.values()) / n for m in MEASURES}
    return {"measures": measures, "per_query": per_query, "queries": n,
            "missing": sorted(set(judged) - set(common)), "ignored": len(set(run) - set(judged)),
            "rel_threshold": rel_threshold}


def format_measures(result: Mapping[str, Any]) -> str:
    lines = [f"{m:<18} {result['measures'][m]:.4f}" for m in MEASURES]
    lines.append(f"{'queries':<18} {result['queries']} (every query with a relevant passage at rel >= "
                 f"{result['rel_threshold']}; {len(result['missing'])} without results count 0, as trec_eval -c)")
    if result.get("ignored"):
        lines.append(f"{'ignored':<18} {result['ignored']} run queries without qrels")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convret eval",
        description="Evaluate a TREC run against TREC qrels with pytrec_eval: NDCG@3, NDCG@10 (graded), MRR, "
                    "MRR@10 (run cut at 10), MAP, Recall@5/10/20/100/1000 (binary at rel >= R). A query with "
                    "qrels but no results counts 0 (trec_eval -c).")
    p.add_argument("--qrels", required=True, help="TREC qrels: qid 0 docid rel")
    p.add_argument("--run", required=True, help="TREC run: qid Q0 docid rank score tag")
    p.add_argument("--rel_threshold", "--rel-threshold", type=int, default=1,
                   help="binary relevance threshold (CAsT-21 uses 2; default 1)")
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
