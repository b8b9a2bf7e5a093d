"""bench/micro/compare_ratios.py: the in-run speed-up regression check of the micro-benchmarks."""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "micro" / "compare_ratios.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_ratios", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_ratios = _load()


def _run(stamp: str, speedups: dict[str, dict[str, float]], smoke: bool = False) -> dict:
    benchmarks = []
    for name, ratios in speedups.items():
        benchmarks.append({"fullname": f"{name}-peer", "extra_info": {"role": "peer", "smoke": smoke}})
        benchmarks.append({"fullname": name, "extra_info": {"role": "convret", "speedup": ratios, "smoke": smoke}})
    return {"datetime": stamp, "benchmarks": benchmarks}


def _save(folder: Path, name: str, run: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(run))
    return path


BASE = {"attn[cpu]": {"eager-dense": 8.0, "sdpa-dense": 3.0}, "info_nce": {"naive-ce": 1.5}}


def test_unchanged_and_small_changes_pass(tmp_path, capsys):
    current = copy.deepcopy(BASE)
    current["attn[cpu]"]["sdpa-dense"] = 3.0 * 0.8  # a 20% drop stays under the 25% default
    current["info_nce"]["naive-ce"] = 2.0  # faster: never a regression
    a = _save(tmp_path, "a.json", _run("2026-01-01T00:00:00", BASE))
    b = _save(tmp_path, "b.json", _run("2026-01-02T00:00:00", current))
    assert compare_ratios.main([str(a), str(b)]) == 0
    assert "no speed-up dropped" in capsys.readouterr().out


def test_a_drop_past_the_threshold_fails_and_names_the_benchmark(tmp_path, capsys):
    current = copy.deepcopy(BASE)
    current["attn[cpu]"]["eager-dense"] = 8.0 * 0.7  # 30% drop
    a = _save(tmp_path, "a.json", _run("2026-01-01T00:00:00", BASE))
    b = _save(tmp_path, "b.json", _run("2026-01-02T00:00:00", current))
    assert compare_ratios.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "attn[cpu] vs eager-dense: 8.00x -> 5.60x" in out
    assert "sdpa-dense" in out and "REGRESSION" in out
    # the same drop passes under a looser threshold
    assert compare_ratios.main(["--max-drop", "35", str(a), str(b)]) == 0


def test_latest_two_runs_are_found_by_their_datetime_not_their_name(tmp_path, capsys):
    machine = tmp_path / "Linux-CPython-3.11-64bit"
    regressed = copy.deepcopy(BASE)
    regressed["info_nce"]["naive-ce"] = 0.5
    _save(machine, "0003_old.json", _run("2026-01-01T00:00:00", regressed))  # oldest despite its name
    _save(machine, "0001_base.json", _run("2026-01-02T00:00:00", BASE))
    _save(machine, "0002_now.json", _run("2026-01-03T00:00:00", regressed))
    assert compare_ratios.main(["--storage", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "0001_base.json" in out and "0002_now.json" in out and "0003_old.json" not in out


def test_nothing_to_compare_is_an_error_not_a_pass(tmp_path, capsys):
    assert compare_ratios.main(["--storage", str(tmp_path)]) == 2  # no run at all
    _save(tmp_path, "a.json", _run("2026-01-01T00:00:00", BASE))
    assert compare_ratios.main(["--storage", str(tmp_path)]) == 2  # a single run
    smoke = _save(tmp_path, "b.json", _run("2026-01-02T00:00:00", BASE, smoke=True))
    assert compare_ratios.main([str(tmp_path / "a.json"), str(smoke)]) == 2  # smoke runs carry no ratios
    (tmp_path / "bad.json").write_text("{not json")
    assert compare_ratios.main([str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "found 0" in err and "found 1" in err and "share no" in err and "bad.json" in err


def test_real_micro_run_records_ratios_and_a_doctored_copy_fails(tmp_path):
    """End to end: a short real run of one micro-benchmark group writes extra_info["speedup"]; the same JSON
    with the speed-up halved makes the check fail."""
    saved = tmp_path / "run.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "bench" / "micro"),
               "-k", "test_layout and small", "--benchmark-min-rounds=3", "--benchmark-max-time=0.05",
               f"--benchmark-json={saved}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads(saved.read_text())
    convret_entries = [b for b in run["benchmarks"] if b["extra_info"]["role"] == "convret"]
    assert len(convret_entries) == 1
    info = convret_entries[0]["extra_info"]
    peer = next(b for b in run["benchmarks"] if b["extra_info"]["role"] == "peer")
    assert info["speedup"]["dense-additive-mask"] == pytest.approx(
        peer["stats"]["median"] / convret_entries[0]["stats"]["median"])
    doctored = copy.deepcopy(run)
    for bench in doctored["benchmarks"]:
        for key in bench["extra_info"].get("speedup", {}):
            bench["extra_info"]["speedup"][key] /= 2
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(doctored))
    assert compare_ratios.main([str(saved), str(saved)]) == 0
    assert compare_ratios.main([str(saved), str(worse)]) == 1
