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
from typing import Any, Mapping, Sequence

from .._args import parse
from .._io import atomic_write
from ..provenance import check_output, content_identity, read_record
from . import _data

__all__ = ["MEASURES", "evaluate_run", "doc_max_aggregate", "format_measures", "judged_documents", "docid_mismatch",
           "main"]

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


# a run whose retrieved documents are judged less than this share of what they could be (see judged_documents)
MIN_JUDGED_SHARE = 0.01
_ID_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]*_")  # CAsT's MARCO_ / CAR_, KILT_, WAPO_
_SAMPLE_IDS = 20_000


def judged_documents(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
                     ) -> dict[str, Any]:
    """How much of ``run`` the qrels judge, over the queries they share: ``judged`` (retrieved documents judged
    for their query, any grade), ``possible`` (the most that could be: per query the smaller of its judged
    documents and its retrieved ones), ``share`` = judged / possible, and ``warning``: ``None``, or, when the share
    is below :data:`MIN_JUDGED_SHARE` (none judged included), a sentence with the counts and the likely cause
    read from the ids' shapes (:func:`docid_mismatch`): with none judged every measure is 0 because of the ids,
    not the model."""
    judged = possible = 0
    for q, docs in run.items():
        graded = qrels.get(q)
        if not graded or not docs:
            continue
        judged += sum(d in graded for d in docs)
        possible += min(len(graded), len(docs))
    share = judged / possible if possible else 1.0
    warning = None
    if possible and share < MIN_JUDGED_SHARE:
        head = ("none of the documents the run retrieved is judged in the qrels" if judged == 0 else
                f"only {judged} of the documents the run retrieved are judged in the qrels ({share:.2%} of the "
                f"{possible} that could be)")
        cause = docid_mismatch(_sample_ids(d for docs in qrels.values() for d in docs),
                               _sample_ids(d for docs in run.values() for d in docs))
        warning = (f"{head}: {cause}" if cause else
                   f"{head}: the measures are about the ids, not the model; check that the run was retrieved from "
                   "the collection these qrels judge (its passage ids are the qrels' document ids)")
    return {"judged": judged, "possible": possible, "share": share, "warning": warning}


def _sample_ids(ids: Any) -> list[str]:
    out: dict[str, None] = {}
    for d in ids:
        out[d] = None
        if len(out) >= _SAMPLE_IDS:
            break
    return list(out)


def docid_mismatch(qrels_ids: Sequence[str], run_ids: Sequence[str]) -> str | None:
    """The likely reason the run's document ids miss the qrels', read from their shapes, or ``None`` when no
    rewriting of one side's ids (a prefix such as CAsT's ``MARCO_`` / ``CAR_``, a passage suffix ``-N``, letter
    case) makes them meet."""
    judged, retrieved = set(qrels_ids), set(run_ids)

    def strip_prefix(ids: set[str]) -> set[str]:
        return {_ID_PREFIX.sub("", d, count=1) for d in ids}

    def strip_passage(ids: set[str]) -> set[str]:
        return {_PASSAGE_SUFFIX.sub(r"\1", d) for d in ids}

    def prefixes(ids: set[str]) -> str:
        counts: dict[str, int] = {}
        for d in ids:
            match = _ID_PREFIX.match(d)
            if match:
                counts[match.group(0)] = counts.get(match.group(0), 0) + 1
        return " / ".join(sorted(counts, key=lambda p: (-counts[p], p))[:4])

    def example(ids: set[str]) -> str:
        return min(ids, key=lambda d: (len(d), d)) if ids else ""

    if strip_prefix(retrieved) & judged:
        return (f"the run's ids carry the prefix {prefixes(retrieved)} that the qrels' ids lack (run e.g. "
                f"{example(retrieved)!r}, qrels e.g. {example(judged)!r}): the collection's ids are prefixed (as "
                "CAsT's MARCO_ / CAR_) and these qrels' are not; use qrels with the same ids (the CAsT originals are "
                "prefixed) or a collection without the prefixes")
    if retrieved & strip_prefix(judged):
        return (f"the qrels' ids carry the prefix {prefixes(judged)} that the run's ids lack (qrels e.g. "
                f"{example(judged)!r}, run e.g. {example(retrieved)!r}): CAsT's qrels prefix MARCO_ / CAR_; encode "
                "a collection whose ids carry the same prefixes, or use qrels without them")
    if strip_passage(retrieved) & judged:
        return (f"the run ranks passages ('docid-N', e.g. {example(retrieved)!r}) but the qrels judge documents "
                f"(e.g. {example(judged)!r}): pass --doc-max-aggregate (each document scored by its best passage)")
    if retrieved & strip_passage(judged):
        return (f"the qrels judge passages ('docid-N', e.g. {example(judged)!r}) but the run ranks documents (e.g. "
                f"{example(retrieved)!r}): evaluate a passage-level run")
    if strip_passage(strip_prefix(retrieved)) & strip_passage(strip_prefix(judged)):
        return (f"the ids differ in prefix and passage suffix (run e.g. {example(retrieved)!r}, qrels e.g. "
                f"{example(judged)!r}): the run was not retrieved from the collection these qrels judge")
    if {d.lower() for d in retrieved} & {d.lower() for d in judged}:
        return (f"the ids differ in letter case only (run e.g. {example(retrieved)!r}, qrels e.g. "
                f"{example(judged)!r})")
    return None


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
        "ignored": number of run queries without qrels, "rel_threshold": R, "judged":`` :func:`judged_documents`
        ``}`` (its ``warning`` says when the run's ids miss the qrels').

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
            "ignored": len(set(run) - set(graded_qrels)), "rel_threshold": rel_threshold,
            "judged": judged_documents(qrels, run)}


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
    p.add_argument("--json", default=None, help="also write {measures, per_query, queries, judged, fingerprint} to "
                                               "this file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file written for another run, qrels or threshold")
    p.add_argument("--doc-max-aggregate", action="store_true",
                   help="passage ids docid-N: score each document by its best passage (CAsT)")
    return p


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    try:
        fingerprint = {"qrels": content_identity(args.qrels), "run": content_identity(args.run),
                       "rel_threshold": args.rel_threshold, "doc_max_aggregate": args.doc_max_aggregate}
        if args.json:
            check_output(args.json, fingerprint, (read_record(args.json) or {}).get("fingerprint"), args.overwrite,
                         "the metrics of a run", "pass --overwrite to replace it, or another --json")
        qrels = _data.load_qrels(args.qrels)
        run = _data.load_run(args.run)
        if args.doc_max_aggregate:
            run = doc_max_aggregate(run)
        result = evaluate_run(qrels, run, args.rel_threshold)
    except (ValueError, OSError) as error:
        print(f"convret eval: error: {error}", file=sys.stderr)
        return 1
    if result["judged"]["warning"]:
        print(f"convret eval: warning: {args.run}: {result['judged']['warning']}", file=sys.stderr)
    print(format_measures(result))
    if args.json:
        result["fingerprint"] = fingerprint
        with atomic_write(args.json) as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
            handle.write("\n")
    return 0
