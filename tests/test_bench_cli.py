"""`convret bench SUBCOMMAND --smoke` end to end: exit code, JSON schema, convret's numerical check against
its reference, the PNG plots, and OOM reporting (forced with a tiny --max-memory-gib guard).

The decomposition peers are checked against the oracle here too: the flash-attn varlen decomposition runs on
CPU with a plain-PyTorch ``flash_attn_varlen_func`` stand-in, which tests its index plan.
"""
import importlib.util
import json
import os

import pytest
import torch

from convret import SessionLayout
from convret.ops.session_attention import reference_attention
from convret.bench import harness
from convret.bench.peers import (SHORT_NAMES, reference_varlen_attention, varlen_decomposition, varlen_plan,
                                  visible_pairs)
from convret.cli import main


def bench(tmp_path, *argv):
    code = main(["bench", *argv, "--out", str(tmp_path)])
    name = argv[0]
    with open(tmp_path / f"{name}.json") as f:
        payload = json.load(f)
    assert (tmp_path / f"{name}.md").read_text().startswith("Command: `convret bench " + name)
    for plot in payload["plots"]:
        assert os.path.getsize(plot) > 1000 and plot.endswith(".png")
    return code, payload


def check_environment(payload):
    env = payload["environment"]
    for key in ("device", "versions", "cpu_flags", "cpu", "torch_threads", "load_average"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__


def test_bench_help_lists_subcommands(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("attention", "loss", "step", "trainer-overhead", "tile-gemm", "encode", "retrieval", "gpu-report",
                 "gpu-check"):
        assert f"  {name} " in out
    assert main(["bench", "nope"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "attention", "--help"])
    assert exit_info.value.code == 0
    assert "--max-memory-gib" in capsys.readouterr().out


def test_attention_smoke_reports_oom_under_a_tiny_guard(tmp_path, capsys):
    code, payload = bench(tmp_path, "attention", "--smoke", "--max-memory-gib", "0.0001",
                          "--peers", "eager,sdpa-decomposition,flash-varlen,convret")
    assert code == 0
    check_environment(payload)
    assert payload["gemm_ceiling"]["fp32"]["gflops"] > 0
    assert payload["passed"] and payload["checks"]["fp32"]["convret"]["passed"]
    assert payload["checks"]["fp32"]["SDPA decomposition"]["passed"]
    assert len(payload["results"]) == 3  # two session lengths + a packed row
    for result in payload["results"]:
        peers = result["peers"]
        assert peers["dense-mask eager"]["status"] == "oom"  # over the guard: reported, not dropped
        assert peers["convret"]["fwd_ms"] > 0 and peers["convret"]["fwd_bwd_ms"] > 0
        assert 0 < peers["convret"]["fwd_gemm_share"]
        assert result["useful_gflop_fwd"] > 0
        if not torch.cuda.is_available():
            assert peers["flash-attn varlen"]["status"] == "skipped"
    memory = {(m["peer"], m["seq_len"]): m for m in payload["memory"]}
    assert all(m["status"] == "oom" for (peer, _), m in memory.items() if peer == "dense-mask eager")
    assert all(m["peak_above_inputs_bytes"] > 0 for (peer, _), m in memory.items() if peer == "convret")
    assert "| OOM |" in capsys.readouterr().out


def test_loss_smoke(tmp_path):
    code, payload = bench(tmp_path, "loss", "--smoke", "--no-memory", "--max-memory-gib", "0.002")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    for kind, ours in (("info_nce", "convret.info_nce"), ("lm", "convret.linear_cross_entropy")):
        assert payload["checks"][kind]["passed"]
        small, large = payload["results"][kind]
        naive = next(iter(small["methods"]))
        assert small["methods"][naive]["ms"] > 0
        assert large["methods"][naive]["status"] == "oom"  # its logits exceed the 2 MiB guard
        assert large["methods"][ours]["ms"] > 0
        assert abs(small["methods"][naive]["loss"] - small["methods"][ours]["loss"]) < 1e-4 * abs(
            small["methods"][naive]["loss"])


def test_step_smoke_ablation_rows_match_the_reference(tmp_path):
    code, payload = bench(tmp_path, "step", "--smoke", "--no-memory")
    assert code == 0 and payload["passed"]
    rows = payload["results"]
    assert rows[0]["config"]["name"].startswith("reference")
    assert len(rows) >= 5
    for row in rows:
        assert row["ms"] > 0 and row["loss_relative_error"] <= 1e-4 and row["grad_relative_max_error"] <= 2e-3


def test_encode_smoke(tmp_path):
    code, payload = bench(tmp_path, "encode", "--smoke", "--no-memory")
    assert code == 0 and payload["passed"]
    assert payload["equality"]["max_abs_diff"] <= 1e-5
    ways = payload["throughput"]["ways"]
    assert set(ways) == {"convret encoder", "HF padded, sdpa"}
    assert all(r["passages_per_s"] > 0 for r in ways.values())
    # the peak-memory child, in-process here (fresh processes cost ~15 s each on the CI machine)
    from convret.bench.encode import peak_child

    shape = payload["shape"]
    for way in ("convret encoder", "HF padded batch of 2, sdpa"):
        record = peak_child(shape, way, 128)
        assert record["status"] == "ok" and record["peak_above_model_bytes"] >= 0 and record["seconds"] > 0


def test_attention_peak_child_runs_every_cpu_peer():
    """The fresh-process peak measurement, in-process: forward-only peers (FlexAttention on CPU) must not be
    handed inputs that require grad."""
    import argparse

    from convret.bench import attention, cli

    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    cli.common_arguments(parser)
    ns = parser.parse_args(["--smoke"])
    attention.apply_presets(ns)
    args = vars(ns)
    case = {"name": "session 32", "sweep": "session", "session": 32, "response": 16, "packed": False}
    for peer in ("compiled FlexAttention", "dense-mask eager", "convret"):
        record = attention.peak_child(case, args, "fp32", peer, "cpu")
        assert record["status"] == "ok", record
        assert record["mode"] == ("fwd" if peer == "compiled FlexAttention" else "fwd+bwd")


@pytest.mark.parametrize("flags", [["avx512f", "avx512_bf16"], ["amx_bf16"], ["avx2", "fma"]])
def test_attention_presets_time_flex_and_bf16_where_the_cpu_has_bf16_units(monkeypatch, flags):
    """Every preset times compiled FlexAttention; --quick on a CPU with bf16 units (AVX512-BF16 or AMX) also
    runs bf16, and only fp32 elsewhere."""
    import argparse

    from convret.bench import attention, cli
    from convret.bench import harness as H

    monkeypatch.setattr(H, "cpu_flags", lambda: flags)
    for preset in ("--quick", "--smoke", None):
        parser = argparse.ArgumentParser()
        attention.add_arguments(parser)
        cli.common_arguments(parser)
        ns = parser.parse_args(["--device", "cpu"] + ([preset] if preset else []))
        attention.apply_presets(ns)
        peers = ns.peers or list(SHORT_NAMES)
        assert "flex" in peers, (preset, peers)
        if preset == "--quick":
            assert ns.dtypes == (["fp32", "bf16"] if "avx2" not in flags else ["fp32"])


def test_gpu_report_smoke(tmp_path):
    code, payload = bench(tmp_path, "gpu-report", "--smoke")
    assert code == 0
    assert {row["target"] for row in payload["compile"]} == {"sm_80", "sm_90"}
    for row in payload["compile"]:
        assert 0 < row["occupancy"] <= 1 and row["blocks_per_sm"] >= 1 and not row["spills"]
    assert any(row["skipped_fraction"] > 0.5 for row in payload["tiles"])


def test_gpu_check_without_cuda_is_incomplete_not_a_pass(tmp_path):
    if torch.cuda.is_available():
        code, payload = bench(tmp_path, "gpu-check", "--smoke", "--no-timing")
        assert code == 0, payload["verdict"]
        return
    code, payload = bench(tmp_path, "gpu-check", "--smoke", "--interpret", "--no-timing")
    assert code == 4 and payload["verdict"].startswith("INCOMPLETE")
    status = {item["check"]: item["status"] for item in payload["checks"]}
    assert status["session attention fwd+bwd, D=64, fp32"] == "pass"
    assert status["linear cross-entropy fwd+bwd, fp16"] == "pass"
    assert status["InfoNCE fwd+bwd, bf16"] == "not run"
    assert not any(s == "FAIL" for s in status.values())


def test_varlen_decomposition_index_plan_matches_the_oracle():
    torch.manual_seed(0)
    layout = SessionLayout.from_segments([[(20, 3, 9), (11, 3, 0)], [(7, 3, 14 + 3), (5, 2, 0)]], 50)
    q = torch.randn(2, 4, 50, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 50, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 50, 16, dtype=torch.float64, requires_grad=True)
    plan = varlen_plan(layout, "cpu")
    got = varlen_decomposition(q, k, v, plan, 0.25, varlen_fn=reference_varlen_attention)
    want = reference_attention(q, k, v, layout, 0.25)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), grad)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w)
    assert visible_pairs(layout) == int(layout.dense_mask().sum())


def test_retrieval_smoke(tmp_path):
    code, payload = bench(tmp_path, "retrieval", "--smoke")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    enc = payload["encode"]
    assert enc["large"]["passages"] == 3000 and enc["large"]["passages_per_s"] > 0
    assert enc["large"]["peak_rss_bytes"] > 0 and enc["small"]["peak_rss_bytes"] > 0
    assert list(payload["index"]) == ["Flat", "IVF64,Flat"]
    for record in payload["index"].values():
        assert record["peak_rss_bytes"] > 0 and record["index_bytes"] > 0
    flat, ivf = payload["search"]["Flat"], payload["search"]["IVF64,Flat"]
    assert flat[0]["recall"] == 1.0
    recalls = [r["recall"] for r in ivf]
    assert recalls[-1] == pytest.approx(1.0) and recalls[0] < recalls[-1]  # nprobe = nlist is exact
    assert not (tmp_path / "retrieval-work").exists()


def test_harness_oom_detection_and_guard():
    assert harness.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert harness.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 GB"))
    assert not harness.is_oom(ValueError("shape mismatch"))
    assert harness.memory_guard_bytes(0.5) == 2**29
    record = harness.oom_result(2**31, 2**30)
    assert record["status"] == "oom" and "guard" in record["reason"]


def test_serve_smoke(tmp_path):
    pytest.importorskip("fastapi")
    code, payload = bench(tmp_path, "serve", "--smoke", "--threads", "1", "--server-threads", "1")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    assert [r["target"] for r in payload["per_turn"]] == [256, 512]
    for row in payload["per_turn"]:
        assert row["max_abs_diff"] <= 1e-5 and row["mean_computed"] < row["mean_tokens"]
        assert row["incremental_median_ms"] > 0 and row["full_median_ms"] > 0
    assert {(r["batching"], r["concurrency"]) for r in payload["service"]} == {(b, c) for b in (True, False)
                                                                                for c in (1, 4)}
    assert all(r["errors"] == 0 and r["requests"] == 3 * r["concurrency"] for r in payload["service"])
    # the in-process ceiling: the same request mix one forward each vs one per round, equal embeddings
    assert [(r["concurrency"], r["requests"]) for r in payload["encoder_batching"]] == [(1, 3), (4, 12)]
    for row in payload["encoder_batching"]:
        assert row["max_abs_diff"] <= 1e-5 and row["single_ms_per_request"] > 0 and row["batched_ms_per_request"] > 0
        assert 0 < row["computed_tokens_per_request"] and row["reused_tokens_per_request"] > 0
    # the memory part: a server over 2,000 passages (its passage store built at its start)
    [memory] = payload["memory"]
    assert memory["passages"] == 2000 and memory["store_mb"] > 0 and memory["dict_mb"] >= 0
    assert 0 < memory["first_rss_mb"] <= memory["first_peak_mb"]


@pytest.mark.skipif(not __import__("convret.ops.session_attention.cpu", fromlist=["cpu"]).native_available(),
                    reason="native CPU backend not built")
def test_cached_prefill_smoke(tmp_path):
    code, payload = bench(tmp_path, "cached-prefill", "--smoke", "--threads", "1")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    [row] = payload["attention"]
    assert row["max_abs_diff"] < 1e-5 and row["cpu_ms"] > 0 and row["sdpa_ms"] > 0
    [e2e] = payload["end_to_end"]
    assert e2e["target"] == 128 and e2e["max_abs_diff"] <= 1e-5 and e2e["mean_computed"] < e2e["mean_tokens"]


@pytest.mark.skipif(not __import__("convret.ops.session_attention.cpu", fromlist=["cpu"]).native_available(),
                    reason="native CPU backend not built")
def test_cached_prefill_refuses_bad_options(tmp_path, capsys):
    for argv, words in ((["--heads", "4/3/32"], "--heads"), (["--heads", "16/4"], "--heads"),
                        (["--dtypes", "fp8"], "--dtypes"), (["--encoder-lengths", "1k"], "--encoder-lengths"),
                        (["--new", "0"], "positive")):
        assert main(["bench", "cached-prefill", *argv, "--out", str(tmp_path)]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.skipif(not __import__("convret.ops.session_attention.cpu", fromlist=["cpu"]).native_available(),
                    reason="native CPU backend not built")
def test_tile_gemm_smoke_times_every_variant_and_peer(tmp_path):
    code, payload = bench(tmp_path, "tile-gemm", "--smoke", "--peers", "sdpa-decomposition", "--tiles", "16x32:16x32")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    by_dtype = {r["dtype"]: r for r in payload["results"]}
    assert set(by_dtype) == {"fp32", "bf16"}
    assert by_dtype["fp32"]["gemm_ceiling_gflops"] > 0
    native = by_dtype["fp32"]["methods"]["native"]
    assert native["fwd_ms"] > 0 and native["fwd_bwd_ms"] > 0 and native["relative_max_error"] < 2e-4
    bf16 = by_dtype["bf16"]["methods"]
    for name in ("mkl", "onednn", "upcast", "packed", "auto", "packed 16x32:16x32"):
        rec = bf16[name]
        if rec["status"] == "skipped":  # packed where this CPU has no bf16 ukernel: reported, not timed
            assert name.startswith("packed") and rec["reason"]
            continue
        assert rec["passed"] and rec["fwd_ms"] > 0 and rec["fwd_bwd_ms"] > 0
        assert rec["fwd_vs_best_peer"] > 0
    assert bf16["SDPA decomposition"]["fwd_ms"] > 0
    assert set(by_dtype["bf16"]["backward_schedules"]) == {"fused", "split"}


def test_tile_gemm_rejects_a_bad_tile_spec(tmp_path):
    with pytest.raises(SystemExit, match="FWD_MxFWD_N"):
        main(["bench", "tile-gemm", "--smoke", "--dtypes", "bf16", "--tiles", "32:16", "--out", str(tmp_path)])


def test_trainer_overhead_smoke(tmp_path):
    code, payload = bench(tmp_path, "trainer-overhead", "--smoke")
    assert code == 0 and payload["passed"]
    check_environment(payload)
    assert payload["bare_ms"] > 0 and payload["trainer_ms"] > 0
    assert len(payload["bare_runs_ms"]) == len(payload["trainer_runs_ms"]) == 2  # 1 warm-up + 1 timed
    assert payload["first_loss"]["bare"] == pytest.approx(payload["first_loss"]["trainer"], abs=1e-4)


def test_every_bench_script_is_a_one_line_wrapper_of_a_subcommand():
    """One way to run each benchmark: a bench/bench_*.py script only hands its arguments to a subcommand."""
    import ast
    import pathlib

    from convret.bench.cli import SUBCOMMANDS

    scripts = sorted((pathlib.Path(__file__).resolve().parents[1] / "bench").glob("bench_*.py"))
    assert len(scripts) >= 7
    for script in scripts:
        tree = ast.parse(script.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], script.name
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
        assert len(calls) == 1, script.name
        first = calls[0].args[0].elts[0]
        assert isinstance(first, ast.Constant) and first.value in SUBCOMMANDS, script.name
