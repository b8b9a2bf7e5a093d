"""``convret bench attention``: session attention against every peer, forward and forward + backward.

Cases (t summary tokens, default 3): a session sweep (session 256 .. 8192, response 384), a response sweep
(session 1024, response 128 .. 1024) and packed rows (one CSIT sample plus as many passages of 384 + t as
fit in a row of --packed-len tokens). Every case runs in every dtype (fp32 and bf16 on CPU; fp16, bf16 and
fp32 on CUDA) with GQA (Hq = 16, Hkv = 4, D = 128 by default).

Time: all peers of one case side by side in one process (one untimed call each, which is also where
FlexAttention compiles, then --reps alternating rounds after --warmup), medians. Peak memory: on CPU one
fresh process per (peer, case) for the first dtype, ``VmHWM`` above the inputs; on CUDA
``max_memory_allocated`` above the inputs in the timing process. A peer that runs out of memory, or whose
estimated need exceeds the memory guard (--max-memory-gib), is reported as OOM at that size.

Roofline: useful FLOPs of the visible (query, key) pairs (4 D per pair and head forward, 14 D forward +
backward), the achieved rate, and its share of a square GEMM of the same device and dtype measured in the
same run (on CUDA fp32 with TF32 allowed, as the Triton kernels use TF32 for fp32).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from convret import SessionLayout
from convret.ops.session_attention import reference_attention

from . import harness as H
from .peers import (CONVRET, FLASH, SDPA_DECOMP, SHORT_NAMES, attention_flops, build_peers,
                    estimated_bytes, flash_attn_status, visible_pairs)

NAME = "attention"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |error| against the float64 oracle, relative to max |oracle|, per dtype (GPU fp32 runs as TF32)
TOLERANCE = {"fp32": 2e-4, "fp32-tf32": 5e-3, "bf16": 3e-2, "fp16": 5e-3}


# ------------------------------------------------------------------------------------------------ cases
def csit_layout(batch: int, session: int, response: int, summary: int, device="cpu") -> SessionLayout:
    segment = (session, summary, response + summary)
    return SessionLayout.from_segments([[segment]] * batch, sum(segment), device=device)


def packed_layout(batch: int, row_len: int, session: int, response: int, passage: int, summary: int,
                  device="cpu") -> SessionLayout:
    csit = (session, summary, response + summary)
    row = [csit]
    used = sum(csit)
    while used + passage + summary <= row_len:
        row.append((passage, summary, 0))
        used += passage + summary
    return SessionLayout.from_segments([row] * batch, row_len, device=device)


def make_cases(args) -> list[dict[str, Any]]:
    cases = []
    for session in args.sessions:
        cases.append({"name": f"session {session} / response {args.response}", "sweep": "session",
                      "session": session, "response": args.response, "packed": False})
    for response in args.responses:
        if response == args.response and args.response_sweep_session in args.sessions:
            continue  # already in the session sweep
        cases.append({"name": f"session {args.response_sweep_session} / response {response}", "sweep": "response",
                      "session": args.response_sweep_session, "response": response, "packed": False})
    if args.packed_len:
        cases.append({"name": f"packed row {args.packed_len}", "sweep": "packed", "session": args.packed_session,
                      "response": args.response, "packed": True, "row_len": args.packed_len})
    return cases


def case_layout(case: dict, args, device="cpu") -> SessionLayout:
    if case["packed"]:
        return packed_layout(args.batch, case["row_len"], case["session"], case["response"], args.passage,
                             args.summary, device)
    return csit_layout(args.batch, case["session"], case["response"], args.summary, device)


def make_inputs(layout: SessionLayout, args, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def draw(heads):
        return torch.randn(layout.batch_size, heads, layout.seq_len, args.head_dim, generator=gen).to(device, dtype)

    return draw(args.q_heads), draw(args.kv_heads), draw(args.kv_heads)


# ------------------------------------------------------------------------------------- numerical check
def check_against_oracle(args, dtype_name: str, device: torch.device, peer_names: list[str]) -> dict:
    """convret (and every decomposition peer) against the float64 dense-mask oracle: output and q/k/v
    gradients, on a small case of the same head configuration."""
    dtype = DTYPES[dtype_name]
    layout = packed_layout(2, 2 * 128 + 2 * args.summary + 64 + 3 * (64 + args.summary), 128, 64, 64,
                           args.summary, device)
    torch.manual_seed(1)
    q, k, v = make_inputs(layout, args, dtype, device, seed=1)
    grad = torch.randn(q.shape, device=device, dtype=dtype)
    scale = args.head_dim**-0.5
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference_attention(q64, k64, v64, layout, scale)
    expected.backward(grad.double())
    oracle = [expected.detach(), q64.grad, k64.grad, v64.grad]
    key = "fp32-tf32" if dtype_name == "fp32" and device.type == "cuda" else dtype_name
    results = {}
    # the dense peers are the oracle's own algorithm (and SDPA gives NaN on padding rows): not checked
    checked = [n for n in peer_names if n in (SDPA_DECOMP, FLASH, CONVRET)]
    for name, peer in build_peers(layout, dtype, device, checked, scale).items():
        if peer.fn is None:
            results[name] = {"status": H.SKIPPED, "reason": peer.unavailable}
            continue
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = peer.fn(qg, kg, vg)
        out.backward(grad)
        errors = {}
        for label, got, want in zip(("out", "dq", "dk", "dv"), (out, qg.grad, kg.grad, vg.grad), oracle):
            errors[label] = float((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1e-12))
        worst = max(errors.values())
        results[name] = {"status": H.OK, "relative_max_error": errors, "tolerance": TOLERANCE[key],
                         "passed": bool(worst <= TOLERANCE[key])}
    return results


# ---------------------------------------------------------------------------------------- measurements
def peak_child(case: dict, args: dict, dtype_name: str, peer: str, device: str) -> dict:
    """Run in a fresh process (CPU): one forward + backward (forward only for forward-only peers) of one
    peer; peak RSS above the inputs."""
    ns = argparse.Namespace(**args)
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    # a first call on a tiny case initialises the libraries (thread pools, BLAS buffers) outside the peak
    tiny = csit_layout(1, 16, 8, ns.summary, device)
    _one_call(tiny, ns, dtype, device, peer)
    layout = case_layout(case, ns, device)
    q, k, v = make_inputs(layout, ns, dtype, device)
    grad = torch.randn(q.shape, dtype=dtype, device=device)
    with H.PeakMemory(device) as peak:
        p = build_peers(layout, dtype, device, [peer], ns.head_dim**-0.5)[peer]
        if p.fn is None:
            return {"status": H.SKIPPED, "reason": p.unavailable}
        if p.has_backward:
            qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
            p.fn(qg, kg, vg).backward(grad)
            mode = "fwd+bwd"
        else:
            with torch.no_grad():
                p.fn(q, k, v)
            mode = "fwd"
    return {"status": H.OK, "peak_above_inputs_bytes": peak.above_start_bytes, "peak_process_bytes": peak.peak_bytes,
            "mode": mode}


def _one_call(layout, ns, dtype, device, peer) -> None:
    q, k, v = make_inputs(layout, ns, dtype, device)
    p = build_peers(layout, dtype, device, [peer], ns.head_dim**-0.5)[peer]
    if p.fn is not None and p.has_backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        p.fn(q, k, v).sum().backward()
    elif p.fn is not None:  # forward-only peers (FlexAttention on CPU) refuse inputs that require grad
        with torch.no_grad():
            p.fn(q, k, v)


def time_case(case: dict, args, dtype_name: str, device: torch.device, peer_names: list[str], guard: int,
              ceiling_gflops: float) -> dict:
    dtype = DTYPES[dtype_name]
    layout = case_layout(case, args, device)
    q, k, v = make_inputs(layout, args, dtype, device)
    grad = torch.randn(q.shape, dtype=dtype, device=device)
    scale = args.head_dim**-0.5
    flops_fwd = attention_flops(layout, args.q_heads, args.head_dim, backward=False)
    flops_bwd = attention_flops(layout, args.q_heads, args.head_dim, backward=True)
    records: dict[str, dict] = {}
    runnable_fwd, runnable_bwd = {}, {}
    for name in peer_names:
        need = estimated_bytes(name, layout, args.q_heads, dtype, backward=True)
        if need > guard:
            records[name] = H.oom_result(need, guard)
            continue
        try:
            peer = build_peers(layout, dtype, device, [name], scale)[name]
        except Exception as error:  # noqa: BLE001
            records[name] = ({"status": H.OOM, "reason": str(error)[:300]} if H.is_oom(error)
                             else {"status": H.ERROR, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            continue
        if peer.fn is None:
            records[name] = {"status": H.SKIPPED, "reason": peer.unavailable}
            continue
        record: dict[str, Any] = {"status": H.OK, "note": peer.note}
        records[name] = record
        fn = peer.fn
        try:  # the first call: compiles FlexAttention, and surfaces an OOM before the timed rounds
            first = H.timed_ms(lambda: _forward(fn, q, k, v), reps=1, warmup=0, device=device)[0]
            record["first_call_ms"] = first
            runnable_fwd[name] = lambda fn=fn: _forward(fn, q, k, v)
            if peer.has_backward:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                step = (lambda fn=fn, qg=qg, kg=kg, vg=vg: _fwd_bwd(fn, qg, kg, vg, grad))
                step()
                runnable_bwd[name] = step
        except Exception as error:  # noqa: BLE001
            if not H.is_oom(error):
                raise
            records[name] = {"status": H.OOM, "reason": f"{type(error).__name__}: {str(error)[:200]}"}
            runnable_fwd.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for label, runnable, flops in (("fwd", runnable_fwd, flops_fwd), ("fwd_bwd", runnable_bwd, flops_bwd)):
        if not runnable:
            continue
        times = H.interleaved_ms(runnable, reps=args.reps, warmup=args.warmup, device=device)
        for name, runs in times.items():
            ms = sorted(runs)[len(runs) // 2]
            records[name][f"{label}_ms"] = ms
            records[name][f"{label}_runs_ms"] = runs
            records[name][f"{label}_gflops"] = flops / (ms * 1e-3) / 1e9
            records[name][f"{label}_gemm_share"] = flops / (ms * 1e-3) / 1e9 / ceiling_gflops
    if device.type == "cuda":  # CUDA peaks in this process: exact per call through max_memory_allocated
        for name in list(runnable_bwd) + [n for n in runnable_fwd if n not in runnable_bwd]:
            fn = runnable_bwd.get(name) or runnable_fwd[name]
            torch.cuda.empty_cache()
            with H.PeakMemory(device) as peak:
                fn()
            records[name]["peak_above_inputs_bytes"] = peak.above_start_bytes
            records[name]["peak_mode"] = "fwd+bwd" if name in runnable_bwd else "fwd"
    return {"case": case, "dtype": dtype_name, "seq_len": layout.seq_len, "batch": layout.batch_size,
            "samples_per_row": len(layout.segments[0]), "visible_pairs": visible_pairs(layout),
            "masked_fraction": 1 - visible_pairs(layout) / (layout.batch_size * layout.seq_len**2),
            "useful_gflop_fwd": flops_fwd / 1e9, "useful_gflop_fwd_bwd": flops_bwd / 1e9, "peers": records}


def _forward(fn, q, k, v):
    with torch.no_grad():
        return fn(q, k, v)


def _fwd_bwd(fn, q, k, v, grad):
    fn(q, k, v).backward(grad)
    q.grad = k.grad = v.grad = None


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=_ints, default=[256, 512, 1024, 2048, 4096, 8192],
                        help="session lengths of the session sweep (default 256,512,1024,2048,4096,8192)")
    parser.add_argument("--response", type=int, default=384, help="response length of the session sweep (384)")
    parser.add_argument("--responses", type=_ints, default=[128, 256, 512, 1024],
                        help="response lengths of the response sweep (default 128,256,512,1024)")
    parser.add_argument("--response-sweep-session", type=int, default=1024,
                        help="session length of the response sweep (1024)")
    parser.add_argument("--packed-len", type=int, default=4096,
                        help="row length of the packed case: one CSIT sample + passages (4096; 0 = none)")
    parser.add_argument("--packed-session", type=int, default=1024, help="session length in the packed row")
    parser.add_argument("--passage", type=int, default=384, help="passage length in the packed row (384)")
    parser.add_argument("--summary", type=int, default=3, help="summary tokens t (3)")
    parser.add_argument("--batch", type=int, default=2, help="rows B (2)")
    parser.add_argument("--q-heads", type=int, default=16, help="query heads Hq (16)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads Hkv, GQA when < Hq (4)")
    parser.add_argument("--head-dim", type=int, default=128, choices=[32, 64, 128], help="head dim D (128)")
    parser.add_argument("--dtypes", type=_names, default=None,
                        help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU; fp16,bf16,fp32 on CUDA)")
    parser.add_argument("--peers", type=_names, default=None,
                        help="comma list of " + ",".join(SHORT_NAMES) + " (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def apply_presets(args) -> None:
    # every preset times compiled FlexAttention (the peer most users would pick; its compile is in the untimed
    # first call): the presets differ in sizes and dtypes only
    if args.smoke:
        args.sessions, args.responses, args.packed_len, args.packed_session = [64, 128], [32], 256, 64
        args.response, args.response_sweep_session, args.passage = 32, 64, 32
        args.batch, args.q_heads, args.kv_heads, args.head_dim = 1, 4, 2, 32
        args.reps, args.warmup = 2, 0
        args.dtypes = args.dtypes or ["fp32"]
    elif args.quick:
        args.sessions, args.responses, args.packed_len, args.packed_session = [256, 512, 1024], [128], 1024, 256
        args.response, args.response_sweep_session, args.passage = 128, 256, 128
        args.batch, args.q_heads, args.kv_heads, args.head_dim = 1, 8, 2, 64
        args.reps, args.warmup = 3, 1
        # bf16 on a CPU without avx512_bf16 / AMX runs through conversions, many times slower (--dtypes adds it);
        # on one with bf16 units it is the dtype to measure
        if args.dtypes is None:
            args.dtypes = ["fp32", "bf16"] if args.device == "cpu" and H.cpu_has_bf16_units() else ["fp32"]


def run(args, argv: list[str]) -> int:
    apply_presets(args)
    device = torch.device(args.device)
    dtype_names = args.dtypes or (["fp16", "bf16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"])
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"convret bench attention: unknown dtype {name!r}; choose from {list(DTYPES)}")
    short = args.peers or list(SHORT_NAMES)
    unknown = [p for p in short if p not in SHORT_NAMES]
    if unknown:
        raise SystemExit(f"convret bench attention: unknown peer(s) {unknown}; choose from {list(SHORT_NAMES)}")
    peer_names = [SHORT_NAMES[p] for p in short]
    if CONVRET not in peer_names:
        peer_names.append(CONVRET)
    guard = H.memory_guard_bytes(args.max_memory_gib, device)
    env = H.environment(device)
    cases = make_cases(args)
    payload: dict[str, Any] = {
        "benchmark": NAME, "command": H.command_line("convret bench", argv), "environment": env,
        "shape": {"batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "summary": args.summary},
        "memory_guard_bytes": guard, "reps": args.reps, "warmup": args.warmup,
        "gemm_ceiling": {}, "checks": {}, "results": [], "memory": [],
    }
    for dtype_name in dtype_names:
        payload["checks"][dtype_name] = check_against_oracle(args, dtype_name, device, peer_names)
    jobs = [(case, d) for d in dtype_names for case in cases]
    for case, dtype_name in H.progress(jobs, "bench attention"):
        if dtype_name not in payload["gemm_ceiling"]:
            with _tf32(device, dtype_name):
                payload["gemm_ceiling"][dtype_name] = H.gemm_ceiling(DTYPES[dtype_name], device,
                                                                     size=1024 if args.smoke else 2048)
        with _tf32(device, dtype_name):
            payload["results"].append(time_case(case, args, dtype_name, device, peer_names, guard,
                                                payload["gemm_ceiling"][dtype_name]["gflops"]))
    if not args.no_memory and device.type == "cpu":
        unavailable = {FLASH: flash_attn_status(device)}
        sweeps = ("session",) if args.smoke else ("session", "packed")
        memory_jobs = [(case, name) for case in cases if case["sweep"] in sweeps for name in peer_names]
        if args.smoke:  # the longest session only: every child is a fresh interpreter
            memory_jobs = [(case, name) for case, name in memory_jobs if case is cases[len(args.sessions) - 1]]
        child_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))}
        for case, name in H.progress(memory_jobs, "peak memory (fresh processes)"):
            layout = case_layout(case, args)
            need = estimated_bytes(name, layout, args.q_heads, DTYPES[dtype_names[0]], backward=True)
            if unavailable.get(name):
                record = {"status": H.SKIPPED, "reason": unavailable[name]}
            elif need > guard:
                record = H.oom_result(need, guard)
            else:
                record = H.run_isolated("convret.bench.attention:peak_child",
                                        {"case": case, "args": child_args, "dtype_name": dtype_names[0],
                                         "peer": name, "device": "cpu"})
            payload["memory"].append({"case": case, "dtype": dtype_names[0], "seq_len": layout.seq_len,
                                      "peer": name, **record})
    elif device.type == "cuda":
        for result in payload["results"]:
            for name, record in result["peers"].items():
                payload["memory"].append({"case": result["case"], "dtype": result["dtype"],
                                          "seq_len": result["seq_len"], "peer": name,
                                          "status": record.get("status"),
                                          "peak_above_inputs_bytes": record.get("peak_above_inputs_bytes"),
                                          "mode": record.get("peak_mode")})
    # convret's own check decides the exit code; the decomposition peers' checks are reported beside it
    payload["passed"] = all(checks[CONVRET]["passed"] for checks in payload["checks"].values())
    report = format_report(payload)
    plots = make_plots(payload, args.out)
    payload["plots"] = [str(p) for p in plots]
    H.finish(args.out, NAME, payload, report)
    return 0 if payload["passed"] else 1


class _tf32:
    """fp32 on CUDA: allow TF32 matmuls while measuring (the Triton kernels use TF32 for fp32 products)."""

    def __init__(self, device: torch.device, dtype_name: str):
        self.active = device.type == "cuda" and dtype_name == "fp32"

    def __enter__(self):
        if self.active:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


# --------------------------------------------------------------------------------------------- report
def format_report(payload: dict) -> str:
    shape = payload["shape"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"B={shape['batch']}, Hq={shape['q_heads']}, Hkv={shape['kv_heads']}, D={shape['head_dim']}, "
             f"t={shape['summary']}; medians of {payload['reps']} side-by-side rounds after {payload['warmup']} "
             f"warm-up; (x%) = achieved useful GFLOP/s as a share of the in-run GEMM ceiling."]
    lines += ["", "Numerical check against the float64 dense-mask oracle (output and q/k/v gradients):", ""]
    rows = []
    for dtype_name, checks in payload["checks"].items():
        for name, check in checks.items():
            if check["status"] != H.OK:
                rows.append([dtype_name, name, "not run", check.get("reason", "")])
            else:
                rows.append([dtype_name, name, "pass" if check["passed"] else "FAIL",
                             f"max relative error {max(check['relative_max_error'].values()):.1e} "
                             f"(tolerance {check['tolerance']:.0e})"])
    lines.append(H.markdown_table(["dtype", "peer", "result", "detail"], rows))
    for dtype_name in payload["gemm_ceiling"]:
        ceiling = payload["gemm_ceiling"][dtype_name]
        lines += ["", f"**{dtype_name}** (GEMM ceiling {ceiling['size']}^3: {ceiling['gflops']:.3g} GFLOP/s)", ""]
        rows = []
        for result in payload["results"]:
            if result["dtype"] != dtype_name:
                continue
            for name, rec in result["peers"].items():
                rows.append([result["case"]["name"], result["seq_len"], f"{100 * result['masked_fraction']:.0f}%",
                             name, _time_cell(rec, "fwd"), _time_cell(rec, "fwd_bwd"),
                             _speedup(result, name, "fwd_ms"), _speedup(result, name, "fwd_bwd_ms")])
        lines.append(H.markdown_table(["case", "L", "masked", "peer", "fwd", "fwd+bwd", "convret speed-up fwd",
                                       "fwd+bwd"], rows))
    unavailable = sorted({f"{name}: {rec['reason']}" for r in payload["results"] for name, rec in r["peers"].items()
                          if rec.get("status") == H.SKIPPED})
    if unavailable:
        lines += ["", "Not run: " + "; ".join(unavailable)]
    if payload["memory"]:
        lines += ["", f"Peak memory above the inputs ({payload['memory'][0]['dtype']}, fwd+bwd; forward only "
                  "for forward-only peers; "
                  + ("fresh process per cell, VmHWM)" if payload["environment"]["device"] == "cpu"
                     else "max_memory_allocated)"), ""]
        seqs = sorted({(m["case"]["name"], m["seq_len"]) for m in payload["memory"]}, key=lambda x: x[1])
        peers = list(dict.fromkeys(m["peer"] for m in payload["memory"]))
        rows = []
        for case_name, seq_len in seqs:
            row = [case_name, seq_len]
            for peer in peers:
                rec = next((m for m in payload["memory"] if m["peer"] == peer and m["case"]["name"] == case_name), None)
                row.append(H.cell(rec, "peak_above_inputs_bytes", H.fmt_mib))
            rows.append(row)
        lines.append(H.markdown_table(["case", "L", *peers], rows))
    lines += ["", "OOM = ran out of memory, or its estimated need exceeds the memory guard "
              f"({payload['memory_guard_bytes'] / 2**30:.1f} GiB)."]
    return "\n".join(lines)


def _time_cell(rec: dict, label: str) -> str:
    if rec.get("status") != H.OK or rec.get(f"{label}_ms") is None:
        return H.cell(rec, f"{label}_ms", H.fmt_ms) if rec.get("status") != H.OK else "n/a"
    return f"{H.fmt_ms(rec[f'{label}_ms'])} ({rec[f'{label}_gflops']:.0f} GFLOP/s, {100 * rec[f'{label}_gemm_share']:.0f}%)"


def _speedup(result: dict, name: str, key: str) -> str:
    ours = result["peers"].get(CONVRET, {}).get(key)
    theirs = result["peers"][name].get(key)
    if name == CONVRET or not ours or not theirs:
        return ""
    return f"{theirs / ours:.2f}x"


def make_plots(payload: dict, out_dir) -> list:
    plots = []
    for dtype_name in payload["gemm_ceiling"]:
        for label, title in (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward")):
            series: dict[str, list] = {}
            for result in payload["results"]:
                if result["dtype"] != dtype_name or result["case"]["sweep"] != "session":
                    continue
                for name, rec in result["peers"].items():
                    if rec.get("status") == H.SKIPPED or (rec.get("status") == H.OK and rec.get(label) is None):
                        continue
                    series.setdefault(name, []).append((result["case"]["session"], rec.get(label)))
            if series:
                plots.append(H.plot_lines(f"{out_dir}/attention_{label[:-3]}_{dtype_name}.png", series,
                                          "session length (tokens)", "median time (ms)",
                                          f"session attention {title}, {dtype_name}, {payload['environment']['device']}"))
    series = {}
    for mem in payload["memory"]:
        if mem["case"]["sweep"] != "session" or mem.get("status") == H.SKIPPED:
            continue
        value = mem.get("peak_above_inputs_bytes")
        series.setdefault(mem["peer"], []).append((mem["case"]["session"], None if value is None else value / 2**20))
    if series:
        plots.append(H.plot_lines(f"{out_dir}/attention_memory.png", series, "session length (tokens)",
                                  "peak memory above inputs (MiB)", "session attention peak memory"))
    return plots
