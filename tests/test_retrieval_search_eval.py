"""convret index / search / eval: brute-force numpy top-k, pytrec_eval's own numbers, bad input."""
import json
import random

import numpy as np
import pytest

from convret.retrieval.embeddings import EmbeddingsError, read_embeddings, write_embeddings
from convret.retrieval.index import build_index, main as index_main
from convret.retrieval.metrics import MEASURES, doc_max_aggregate, evaluate_run, main as eval_main
from convret.retrieval.search import main as search_main


def _read_run_file(path):
    rows = [line.split() for line in open(path, encoding="utf-8")]
    assert all(len(r) == 6 and r[1] == "Q0" for r in rows)
    return rows


def _world(tmp_path, n=300, q=20, dim=16, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    if ties:
        docs[n // 2 :] = docs[: n - n // 2]  # every vector twice: every score tied with another passage's
    queries = rng.standard_normal((q, dim)).astype(np.float32)
    doc_ids = [f"p{i}" for i in range(n)]
    qids = [f"q{i}" for i in range(q)]
    write_embeddings(tmp_path / "docs", doc_ids, docs, shard_size=70)
    write_embeddings(tmp_path / "queries", qids, queries)
    return docs, queries, doc_ids, qids


@pytest.mark.parametrize("ties", [False, True])
def test_search_equals_numpy_brute_force(tmp_path, ties):
    docs, queries, doc_ids, qids = _world(tmp_path, ties=ties)
    assert index_main(["--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "index")]) == 0
    k = 25
    assert search_main(["--index", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"),
                        "--top_k", str(k), "--output", str(tmp_path / "run.trec")]) == 0
    rows = _read_run_file(tmp_path / "run.trec")
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    for qi, qid in enumerate(qids):
        mine = [r for r in rows if r[0] == qid]
        assert [int(r[3]) for r in mine] == list(range(1, k + 1))  # rank from 1
        # oracle: score descending, ties by docid
        order = sorted(range(len(doc_ids)), key=lambda j: (-round(scores[qi, j], 4), doc_ids[j]))[:k]
        assert [r[2] for r in mine] == [doc_ids[j] for j in order]
        np.testing.assert_allclose([float(r[4]) for r in mine], scores[qi, order], rtol=1e-4, atol=1e-4)


def test_ivf_index_and_bad_inputs(tmp_path):
    docs, queries, doc_ids, qids = _world(tmp_path, n=400, dim=8)
    info = build_index(tmp_path / "docs", tmp_path / "ivf", factory="IVF4,Flat", train_sample=200)
    assert info["count"] == 400 and info["factory"] == "IVF4,Flat"
    # query dimension != index dimension
    write_embeddings(tmp_path / "q3", ["a"], np.ones((1, 3), np.float32))
    assert search_main(["--index", str(tmp_path / "ivf"), "--queries", str(tmp_path / "q3"), "--top_k", "5",
                        "--output", str(tmp_path / "bad.trec")]) == 1
    assert not (tmp_path / "bad.trec").exists() and not list(tmp_path.glob(".bad.trec*"))
    # duplicate passage ids
    write_embeddings(tmp_path / "dup", ["a", "b", "a"], np.ones((3, 4), np.float32))
    with pytest.raises(EmbeddingsError, match="duplicate id 'a'"):
        build_index(tmp_path / "dup", tmp_path / "dup-index")
    assert not (tmp_path / "dup-index").exists() and not list(tmp_path.glob(".dup-index*"))
    # empty
    write_embeddings(tmp_path / "empty", [], np.ones((0, 4), np.float32))
    with pytest.raises(EmbeddingsError, match="no embeddings"):
        build_index(tmp_path / "empty", tmp_path / "empty-index")
    # unreadable shard
    (tmp_path / "docs" / "part-00002.npy").write_bytes(b"\x93NUMPY garbage")
    assert index_main(["--embeddings", str(tmp_path / "docs"), "--output", str(tmp_path / "i2")]) == 1
    with pytest.raises(EmbeddingsError, match="part-00002.npy: unreadable"):
        read_embeddings(tmp_path / "docs")
    assert not (tmp_path / "i2").exists()
    with pytest.raises(EmbeddingsError, match="no meta.json"):
        read_embeddings(tmp_path)


def _random_qrels_run(seed):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(30):
        qid = f"q{q}"
        docs = [f"d{i}" for i in rng.sample(range(200), 60)]
        qrels[qid] = {d: rng.choice([0, 0, 1, 2, 3]) for d in docs[:8]}
        if q % 7 != 3:  # some queries have no results
            run[qid] = {d: round(rng.uniform(-1, 1), 3) for d in docs[rng.randint(0, 6):]}
    run["extra"] = {"d1": 1.0}
    qrels["all-zero"] = {"d1": 0}
    # best grade 1 or 2: graded queries that a threshold of 2 or 3 leaves out of the binary measures
    qrels["best-one"], run["best-one"] = {"d1": 1, "d2": 0, "d3": 1}, {"d3": 0.1, "d2": 0.9, "d9": 0.5}
    qrels["best-two"], run["best-two"] = {"d4": 2, "d5": 1}, {"d5": 0.9, "d4": 0.8}
    return qrels, run


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_metrics_equal_pytrec_eval(threshold):
    """pytrec_eval called as trec_eval users call it: the nDCG evaluator on the raw qrels (grades as gains), the
    binary measures with relevance_level (trec_eval -l); then trec_eval -c's means: nDCG over every query with
    a passage of grade >= 1, the binary measures over those with a passage at >= threshold, absent runs 0."""
    import pytrec_eval

    qrels, run = _random_qrels_run(threshold)
    result = evaluate_run(qrels, run, rel_threshold=threshold)
    graded_set = [q for q, d in qrels.items() if max(d.values()) >= 1]
    binary_set = [q for q, d in qrels.items() if max(d.values()) >= threshold]
    assert "best-one" in graded_set and (threshold == 1) == ("best-one" in binary_set)
    assert result["graded_queries"] == len(graded_set) and result["queries"] == len(binary_set)
    assert "all-zero" not in result["per_query"]
    assert result["missing"] == sorted(q for q in graded_set if q not in run) and result["missing"]
    graded = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.3,10"}).evaluate(run)
    binary = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "map", "recall.5,10,20,100,1000"},
                                            relevance_level=threshold).evaluate(run)
    top10 = {q: dict(sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, d in run.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=threshold).evaluate(top10)
    for measure in MEASURES:
        source = cut if measure == "recip_rank_cut_10" else graded if measure.startswith("ndcg") else binary
        over = graded_set if measure.startswith("ndcg") else binary_set
        name = "recip_rank" if measure == "recip_rank_cut_10" else measure
        expected = sum(source[q][name] for q in over if q in source) / len(over)  # -c: absent = 0
        assert result["measures"][measure] == pytest.approx(expected, abs=1e-12), measure
        for q in result["missing"]:
            if q in over:
                assert result["per_query"][q][measure] == 0.0


def test_rel_threshold_leaves_graded_ndcg_alone():
    """The measured case: with --rel_threshold 2 a query whose best grade is 1 still counts in nDCG@3 (it used to
    vanish from every measure), and only the binary measures leave it out."""
    qrels = {"q1": {"a": 2, "b": 0}, "q2": {"c": 1, "d": 0}}
    run = {"q1": {"a": 0.9, "b": 0.1}, "q2": {"d": 0.9, "c": 0.5}}
    result = evaluate_run(qrels, run, rel_threshold=2)
    assert result["measures"]["ndcg_cut_3"] == pytest.approx((1.0 + 1 / np.log2(3)) / 2)
    assert result["measures"]["recip_rank"] == pytest.approx(1.0)  # q1 alone: q2 has nothing at rel >= 2
    assert (result["graded_queries"], result["queries"]) == (2, 1)
    assert set(result["per_query"]["q2"]) == {"ndcg_cut_3", "ndcg_cut_10"}
    with pytest.raises(ValueError, match="rel_threshold must be >= 1"):
        evaluate_run(qrels, run, rel_threshold=0)


def test_hand_checked_case(tmp_path):
    (tmp_path / "qrels").write_text("q1 0 a 2\nq1 0 b 1\nq2 0 c 1\n")
    # q1: a at rank 2, b at rank 12 (beyond 10); q2: no results
    docs = ["x", "a"] + [f"n{i}" for i in range(9)] + ["b"]
    (tmp_path / "run").write_text("".join(f"q1 Q0 {d} {r + 1} {10 - r * 0.5} t\n" for r, d in enumerate(docs)))
    assert eval_main(["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run"), "--json",
                      str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["queries"] == 2
    assert m["measures"]["recip_rank"] == pytest.approx(0.5 / 2)
    assert m["measures"]["recip_rank_cut_10"] == pytest.approx(0.5 / 2)
    assert m["measures"]["recall_10"] == pytest.approx(0.5 / 2)  # a found, b not, q2 counts 0
    assert m["measures"]["recall_20"] == pytest.approx(1.0 / 2)
    assert m["measures"]["map"] == pytest.approx((1 / 2 + 2 / 12) / 2 / 2)
    ideal3 = 2 / np.log2(2) + 1 / np.log2(3)  # trec_eval's gain is the grade itself: a=2, b=1
    assert m["measures"]["ndcg_cut_3"] == pytest.approx(2 / np.log2(3) / ideal3 / 2)
    assert m["per_query"]["q2"]["ndcg_cut_10"] == 0.0


def test_doc_max_aggregate():
    run = {"q": {"D1-0": 0.2, "D1-3": 0.9, "D2-1": 0.5, "plain": 0.1, "D-x-2": 0.3}}
    assert doc_max_aggregate(run) == {"q": {"D1": 0.9, "D2": 0.5, "plain": 0.1, "D-x": 0.3}}


def test_eval_errors(tmp_path):
    (tmp_path / "qrels").write_text("q1 0 a 1\n")
    (tmp_path / "run").write_text("zz Q0 a 1 1.0 t\n")
    with pytest.raises(ValueError, match="no query in common"):
        evaluate_run({"q1": {"a": 1}}, {"zz": {"a": 1.0}})
    assert eval_main(["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run")]) == 1
