"""`convret bench step`'s rounds, headline and allocator comparison, on fake timings (no timed assertions)."""
import json
import os
import random

import pytest

from convret.bench import step as S
from convret.cli import main


def fake_rounds(reference_ms, convret_ms):
    return [{"glibc/reference": r, "glibc/cache": c} for r, c in zip(reference_ms, convret_ms)]


def test_headline_refuses_rounds_that_disagree():
    # the README's earlier run: the load fell during it, per-round speed-ups 5.15x / 8.36x / 12.09x
    ratios = S.round_ratios(fake_rounds([127_300, 93_600, 67_700], [24_720, 11_196, 5_600]),
                            ["glibc/reference"], ["glibc/cache"])
    assert [round(r, 2) for r in ratios] == [5.15, 8.36, 12.09]
    head = S.headline(ratios, max_spread=1.25)
    assert head["ratio"] is None and not head["agree"]
    assert head["message"].startswith("rounds disagree: no headline")
    assert head["min"] == min(ratios) and head["max"] == max(ratios)
    # a generous margin accepts the same rounds, and the headline is their median, not the middle round's time
    assert S.headline(ratios, max_spread=3.0)["ratio"] == pytest.approx(ratios[1])


def test_headline_is_the_median_of_rounds_that_agree():
    ratios = S.round_ratios(fake_rounds([33_000, 32_000, 34_000], [6_000, 5_900, 5_950]),
                            ["glibc/reference"], ["glibc/cache"])
    head = S.headline(ratios, max_spread=1.25)
    assert head["agree"] and head["ratio"] == pytest.approx(sorted(ratios)[1])
    assert head["spread"] == pytest.approx(max(ratios) / min(ratios))
    # exactly at the margin still agrees; just above it does not
    assert S.headline([4.0, 5.0], max_spread=1.25)["ratio"] == pytest.approx(4.5)
    assert S.headline([4.0, 5.01], max_spread=1.25)["ratio"] is None


def test_round_ratio_is_best_reference_over_best_convret_per_round():
    rounds = [{"glibc/reference": 30.0, "jemalloc/reference": 20.0, "glibc/cache": 5.0, "jemalloc/chunked": 8.0},
              {"glibc/reference": 40.0, "jemalloc/reference": None, "glibc/cache": 10.0, "jemalloc/chunked": 4.0},
              {"glibc/reference": None, "jemalloc/reference": None, "glibc/cache": 5.0, "jemalloc/chunked": 4.0}]
    ratios = S.round_ratios(rounds, ["glibc/reference", "jemalloc/reference"], ["glibc/cache", "jemalloc/chunked"])
    assert ratios == [4.0, 10.0, None]  # the reference's best allocator, not glibc's; a round with no reference: None
    assert S.headline([None, None])["ratio"] is None


def test_round_orders_are_seeded_permutations_that_change():
    items = [c.key for c in S.ABLATION]
    orders = S.round_orders(items, 5, random.Random(0))
    assert orders == S.round_orders(items, 5, random.Random(0))
    assert all(sorted(o) == sorted(items) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders != S.round_orders(items, 5, random.Random(1))
    # two rounds never share an order, whatever the seed (independent draws of 3 rows did for seed 0)
    for seed in range(20):
        first, second = S.round_orders(["reference", "chunked", "cache"], 2, random.Random(seed))
        assert second == first[::-1]


def test_allocators_parse_and_missing_ones_are_skipped_with_the_package(tmp_path):
    assert S.parse_allocators("none") == []
    assert S.parse_allocators("jemalloc, glibc,jemalloc") == ["jemalloc", "glibc"]
    with pytest.raises(ValueError, match="mimalloc"):
        S.parse_allocators("glibc,mimalloc")
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    found = S.find_allocators(["glibc", "jemalloc", "tcmalloc"], dirs=[str(tmp_path)])
    assert found["jemalloc"] == {"status": "ok", "preload": str(tmp_path / "libjemalloc.so.2")}
    assert found["tcmalloc"]["status"] == "skipped" and "libtcmalloc-minimal4" in found["tcmalloc"]["reason"]
    assert found["glibc"]["preload"] is None


def test_child_env_sets_or_removes_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/parent/libjemalloc.so.2")
    assert "LD_PRELOAD" not in S.child_env(None)
    assert S.child_env("/x/libtcmalloc_minimal.so.4")["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4"


def test_measure_allocators_picks_each_side_best_and_reports_skipped(monkeypatch):
    ms = {("glibc", "reference"): 33_000, ("jemalloc", "reference"): 20_000, ("glibc", "chunked"): 9_000,
          ("jemalloc", "chunked"): 8_000, ("glibc", "cache"): 5_400, ("jemalloc", "cache"): 5_600}
    peak = {("glibc", "reference"): 7.3, ("jemalloc", "reference"): 6.0, ("glibc", "chunked"): 2.1,
            ("jemalloc", "chunked"): 1.19, ("glibc", "cache"): 1.42, ("jemalloc", "cache"): 1.40}
    calls = []

    def fake_child(target, kwargs, env=None):
        allocator = "jemalloc" if env.get("LD_PRELOAD") else "glibc"
        row = S.ABLATION[kwargs["config_index"]].key
        calls.append((allocator, row))
        return {"status": "ok", "ms": ms[(allocator, row)], "peak_above_model_bytes": peak[(allocator, row)] * 2**30,
                "loss": 2.0}

    monkeypatch.setattr(S.H, "run_isolated", fake_child)
    monkeypatch.setattr(S, "find_allocators", lambda names: {
        "glibc": {"status": "ok", "preload": None}, "jemalloc": {"status": "ok", "preload": "/fake/libjemalloc.so.2"},
        "tcmalloc": {"status": "skipped", "reason": "not installed (apt-get install libtcmalloc-minimal4)"}})
    out = S.measure_allocators(["glibc", "jemalloc", "tcmalloc"], {}, 2, random.Random(0), 2.0, 1e-4, True)
    assert sorted(calls) == sorted(list(ms) * 2)  # every usable cell once per round, nothing for tcmalloc
    assert out["ratios"] == [pytest.approx(20_000 / 5_400)] * 2
    assert (out["best"]["reference_time"]["allocator"], out["best"]["convret_time"]["row"]) == ("jemalloc", "cache")
    assert out["best"]["convret_peak"]["allocator"] == "jemalloc" and out["best"]["convret_peak"]["row"] == "chunked"
    assert all(c["passed"] for c in out["cells"])
    lines = "\n".join(S._allocator_lines(out))
    assert "Skipped tcmalloc: not installed (apt-get install libtcmalloc-minimal4)" in lines
    assert len(out["orders"]) == 2 and sorted(out["orders"][0]) == sorted(f"{a}/{r}" for a, r in ms)


def test_allocator_child_refuses_a_preload_that_did_not_load(tmp_path):
    fake = tmp_path / "libjemalloc.so.2"
    fake.write_bytes(b"")
    out = S.allocator_child({}, 0, preload=str(fake))
    assert out["status"] == "error" and "was not loaded" in out["error"]


def test_step_exits_3_and_writes_no_headline_when_rounds_disagree(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "round_ratios", lambda *a: [5.15, 12.09])
    code = main(["bench", "step", "--smoke", "--no-memory", "--allocators", "none", "--rows", "reference,cache",
                 "--out", str(tmp_path)])
    assert code == 3
    assert "rounds disagree: no headline" in capsys.readouterr().err
    report = (tmp_path / "step.md").read_text()
    assert "**Headline: rounds disagree: no headline" in report
    payload = json.loads((tmp_path / "step.json").read_text())
    assert payload["passed"] and payload["headline"]["ratio"] is None
    assert [r["config"]["key"] for r in payload["results"]] == ["reference", "cache"]
    assert set(payload["load_1min"]) == {"before", "after"}


@pytest.mark.parametrize("argv, needle", [(["--allocators", "glibc,mimalloc"], "mimalloc"),
                                          (["--rows", "chunked,cache"], "reference is required"),
                                          (["--max-round-spread", "0.9"], "--max-round-spread")])
def test_step_refuses_bad_options(tmp_path, capsys, argv, needle):
    assert main(["bench", "step", "--smoke", *argv, "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "step.json")
