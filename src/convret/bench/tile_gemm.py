"""``convret bench tile-gemm``: which tile GEMM the native CPU attention kernels should use, side by side.

At one CSIT shape (default B 2, Hq 16, Hkv 4, D 128, session 1024 + summary 3, response 384 + summary 3), in one
process, rounds alternating between every method:

- convret's native kernels with each 16-bit tile GEMM forced (``mkl``, ``onednn``, ``upcast``: fp32 upcast +
  sgemm, ``packed``: oneDNN's brgemm ukernel on K / V packed once into VNNI pairs, where the CPU has bf16 / fp16
  units, and ``auto``: the probe's own pick); ``--tiles`` adds ``packed`` runs with other tile sizes; fp32 has one
  variant (``native``, sgemm tiles). A variant that cannot run on this CPU is reported, never timed;
- the peers users compare against (``SDPA decomposition``, ``compiled FlexAttention``: forward only on CPU;
  its compile is in the untimed first call);
- the fused and the split backward schedule of the native kernels (``$CONVRET_CPU_BACKWARD``);
- the in-run GEMM ceiling of the same dtype (best 2048^3 matmul, before and after the rounds; the larger).

Every convret variant is checked against the float64 dense-mask oracle (output) at the timed shape. Useful
work: 4 D flops per visible (query, key) pair per query head forward, 14 D forward + backward.
``--cpu-time`` runs on one thread and measures process CPU time instead of wall time (robust to other tenants
of a shared machine). docs/cpu_backend.md explains the variants.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch

from convret.ops.session_attention import cpu as _cpu_backend
from convret.ops.session_attention.cpu import TileSizes, session_attention_cpu
from convret.ops.session_attention import reference_attention

from . import harness as H
from .attention import DTYPES, TOLERANCE, csit_layout, make_inputs
from .peers import FLEX, SDPA_DECOMP, SHORT_NAMES, attention_flops, build_peers

NAME = "tile-gemm"
VARIANTS_16 = ("mkl", "onednn", "upcast", "packed", "auto")
SCHEDULES = ("fused", "split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated fp32, bf16, fp16 (default: bf16,fp32; --smoke: fp32,bf16)")
    parser.add_argument("--variants", default=",".join(VARIANTS_16),
                        help="16-bit tile GEMMs to force, comma-separated (default: mkl,onednn,upcast,packed,auto)")
    parser.add_argument("--tiles", default="",
                        help="extra packed runs with other tile sizes, ';'-separated FWD_MxFWD_N:BWD_MxBWD_N, "
                             "e.g. 32x128:32x64;64x128:32x64")
    parser.add_argument("--peers", default="sdpa-decomposition,flex",
                        help="peers timed beside convret, comma-separated short names "
                             "(sdpa-decomposition, flex, eager, sdpa-mask; '' for none)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--no-schedules", action="store_true",
                        help="skip the fused / split backward-schedule comparison")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, process CPU time instead of wall time (for a shared machine)")
    parser.add_argument("--batch", type=int, default=2, help="rows B (2)")
    parser.add_argument("--q-heads", type=int, default=16, help="query heads Hq (16)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads Hkv (4)")
    parser.add_argument("--head-dim", type=int, default=128, choices=[32, 64, 128], help="head dim D (128)")
    parser.add_argument("--session", type=int, default=1024, help="session tokens (1024)")
    parser.add_argument("--response", type=int, default=384, help="response tokens (384)")
    parser.add_argument("--summary", type=int, default=3, help="summary tokens t (3)")


def apply_presets(args) -> None:
    args.ceiling_size = 2048
    if args.smoke:
        args.batch, args.q_heads, args.kv_heads, args.head_dim = 1, 4, 2, 32
        args.session, args.response = 64, 32
        args.reps, args.warmup = 1, 0
        args.dtypes = args.dtypes or "fp32,bf16"
        args.ceiling_size = 512
    elif args.quick:  # a loaded 2-core machine's size (docs/cpu_backend.md)
        args.session, args.response = 256, 96
        args.reps, args.warmup = min(args.reps, 3), 1
    args.dtypes = args.dtypes or "bf16,fp32"


def parse_tiles(text: str) -> dict[str, TileSizes]:
    out = {}
    for spec in filter(None, text.split(";")):
        try:
            fwd, bwd = spec.split(":")
            fm, fn = map(int, fwd.split("x"))
            bm, bn = map(int, bwd.split("x"))
        except ValueError:
            raise SystemExit(f"convret bench tile-gemm: --tiles {spec!r} is not FWD_MxFWD_N:BWD_MxBWD_N") from None
        out[f"packed {spec}"] = TileSizes(fm, fn, bm, bn)
    return out


def _ceiling(dtype: torch.dtype, clock: Callable[[], float], size: int = 2048) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * size**3 / best / 1e9


def measure_dtype(args, dtype_name: str, clock: Callable[[], float]) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    layout = csit_layout(args.batch, args.session, args.response, args.summary)
    q, k, v = make_inputs(layout, args, dtype, "cpu")
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = args.head_dim**-0.5
    backward = not args.no_backward
    flops = {"fwd": attention_flops(layout, args.q_heads, args.head_dim, False),
             "fwd_bwd": attention_flops(layout, args.q_heads, args.head_dim, True)}
    oracle = reference_attention(q.double(), k.double(), v.double(), layout, scale)

    # name -> (set-up before each call, forward, forward + backward or None)
    methods: dict[str, tuple[Callable, Callable, Callable | None]] = {}
    records: dict[str, dict[str, Any]] = {}
    variants: dict[str, tuple[str, TileSizes | None]] = {}
    if dtype == torch.float32:
        variants["native"] = ("fp32", None)
    else:
        for name in filter(None, args.variants.split(",")):
            if name not in VARIANTS_16:
                raise SystemExit(f"convret bench tile-gemm: unknown variant {name!r}; choose from {VARIANTS_16}")
            variants[name] = (name, None)
        variants.update({n: ("packed", t) for n, t in parse_tiles(args.tiles).items()})

    def convret_method(impl: str, tiles: TileSizes | None):
        def setup():
            if impl != "fp32":
                _cpu_backend.set_tile_gemm(dtype, impl)

        def fwd():
            with torch.no_grad():
                return session_attention_cpu(q, k, v, layout, scale, implementation="native", tile_sizes=tiles)

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            session_attention_cpu(qg, kg, vg, layout, scale, implementation="native", tile_sizes=tiles).backward(grad)
            qg.grad = kg.grad = vg.grad = None

        return setup, fwd, fwd_bwd

    for name, (impl, tiles) in variants.items():
        picked = None
        try:
            if impl == "auto":  # probe once here; the timed rounds force what it picked
                picked = _cpu_backend.set_tile_gemm(dtype, "auto").split(";")[0]
                impl = picked.split()[0]
            setup, fwd, fwd_bwd = convret_method(impl, tiles)
            setup()
        except RuntimeError as error:  # e.g. packed where oneDNN has no 16-bit ukernel on this CPU
            records[name] = {"status": H.SKIPPED, "reason": str(error).splitlines()[0]}
            continue
        out = fwd().double()
        error = float((out - oracle).abs().max() / oracle.abs().max().clamp_min(1e-12))
        records[name] = {"status": H.OK, "kind": "convret", "relative_max_error": error,
                         "tolerance": TOLERANCE[dtype_name], "passed": bool(error <= TOLERANCE[dtype_name])}
        if picked:
            records[name]["picked"] = picked
        methods[name] = (setup, fwd, fwd_bwd if backward else None)

    peer_names = [SHORT_NAMES[p] for p in filter(None, args.peers.split(","))]
    for name, peer in build_peers(layout, dtype, torch.device("cpu"), peer_names, scale).items():
        if peer.fn is None:
            records[name] = {"status": H.SKIPPED, "reason": peer.unavailable}
            continue
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def pf(fn=peer.fn):
            with torch.no_grad():
                fn(q, k, v)

        def pfb(fn=peer.fn, qg=qg, kg=kg, vg=vg):
            fn(qg, kg, vg).backward(grad)
            qg.grad = kg.grad = vg.grad = None

        records[name] = {"status": H.OK, "kind": "peer", "note": peer.note}
        methods[name] = (lambda: None, pf, pfb if backward and peer.has_backward else None)

    for setup, fwd, fwd_bwd in methods.values():  # first calls: FlexAttention compiles, ukernels are generated
        setup()
        fwd()
        if fwd_bwd:
            fwd_bwd()
    ceilings = [_ceiling(dtype, clock, args.ceiling_size)]
    times = {name: {"fwd": [], "fwd_bwd": []} for name in methods}
    for round_index in H.progress(range(args.warmup + args.reps), f"tile-gemm {dtype_name}"):
        for name, (setup, fwd, fwd_bwd) in methods.items():
            setup()
            for label, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                if fn is None:
                    continue
                start = clock()
                fn()
                if round_index >= args.warmup:
                    times[name][label].append((clock() - start) * 1e3)
    ceilings.append(_ceiling(dtype, clock, args.ceiling_size))
    ceiling = max(ceilings)
    for name, per_label in times.items():
        for label, runs in per_label.items():
            if runs:
                ms = statistics.median(runs)
                records[name].update({f"{label}_ms": ms, f"{label}_runs_ms": runs,
                                      f"{label}_gflops": flops[label] / ms / 1e6,
                                      f"{label}_gemm_share": flops[label] / ms / 1e6 / ceiling})
    for label in ("fwd", "fwd_bwd"):
        best = min((r[f"{label}_ms"] for r in records.values() if r.get("kind") == "peer" and f"{label}_ms" in r),
                   default=None)
        for rec in records.values():
            if best and rec.get("kind") == "convret" and f"{label}_ms" in rec:
                rec[f"{label}_vs_best_peer"] = best / rec[f"{label}_ms"]
    if dtype != torch.float32:
        _cpu_backend.set_tile_gemm(dtype, "auto")

    schedules: dict[str, Any] = {}
    if backward and not args.no_schedules:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            session_attention_cpu(qg, kg, vg, layout, scale, implementation="native").backward(grad)
            qg.grad = kg.grad = vg.grad = None

        previous = os.environ.get(_cpu_backend.ENV_BACKWARD)
        try:
            for schedule in SCHEDULES:
                os.environ[_cpu_backend.ENV_BACKWARD] = schedule
                fwd_bwd()
                runs = []
                for _ in range(args.reps):
                    start = clock()
                    fwd_bwd()
                    runs.append((clock() - start) * 1e3)
                schedules[schedule] = {"fwd_bwd_ms": statistics.median(runs), "runs_ms": runs}
        finally:
            if previous is None:
                os.environ.pop(_cpu_backend.ENV_BACKWARD, None)
            else:
                os.environ[_cpu_backend.ENV_BACKWARD] = previous
    return {"dtype": dtype_name, "seq_len": layout.seq_len, "useful_gflop": {k: v / 1e9 for k, v in flops.items()},
            "gemm_ceiling_gflops": ceiling, "gemm_ceiling_size": args.ceiling_size,"gemm_ceiling_before_after": ceilings, "methods": records,
            "backward_schedules": schedules}


def run(args, argv: list[str]) -> int:
    apply_presets(args)
    if args.device != "cpu":
        raise SystemExit("convret bench tile-gemm: CPU only (the tile GEMMs are the native CPU kernels')")
    if not _cpu_backend.native_available():
        raise SystemExit(f"convret bench tile-gemm: the native CPU backend is not available: "
                         f"{_cpu_backend.backend_info()['reason']}")
    parse_tiles(args.tiles)  # a bad --tiles fails before anything runs
    dtype_names = [d for d in args.dtypes.split(",") if d]
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"convret bench tile-gemm: unknown dtype {name!r}; choose from {list(DTYPES)}")
    for name in filter(None, args.peers.split(",")):
        if name not in SHORT_NAMES or SHORT_NAMES[name] == SHORT_NAMES["convret"]:
            raise SystemExit(f"convret bench tile-gemm: unknown peer {name!r}; choose from "
                             f"{[n for n in SHORT_NAMES if n != 'convret']}")
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    payload: dict[str, Any] = {
        "command": H.command_line("convret bench", argv), "environment": H.environment("cpu"),
        "clock": "process CPU time, 1 thread" if args.cpu_time else "wall time",
        "shape": {"batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "session": args.session, "response": args.response, "summary": args.summary},
        "reps": args.reps, "warmup": args.warmup, "tile_gemm_probe": _cpu_backend.tile_gemm_info(),
        "results": [measure_dtype(args, name, clock) for name in dtype_names], "plots": []}
    payload["passed"] = all(rec.get("passed", True) for r in payload["results"] for rec in r["methods"].values())
    payload["environment"]["load_average_after"] = list(os.getloadavg())
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    shape = payload["shape"]
    after = ", ".join(f"{x:.1f}" for x in payload["environment"]["load_average_after"])
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"])
             + f" (after: {after})", "",
             f"B={shape['batch']}, Hq={shape['q_heads']}, Hkv={shape['kv_heads']}, D={shape['head_dim']}, session "
             f"{shape['session']} + {shape['summary']}, response {shape['response']} + {shape['summary']}; "
             f"{payload['clock']}; medians of {payload['reps']} side-by-side rounds after {payload['warmup']} "
             f"warm-up; (x%) = useful GFLOP/s as a share of the in-run GEMM ceiling of the same dtype.", "",
             "Probe (`convret.backend_info()[\"tile_gemm\"]`): "
             + "; ".join(f"{k}: {v}" for k, v in payload["tile_gemm_probe"].items())]
    for result in payload["results"]:
        before, after_c = result["gemm_ceiling_before_after"]
        lines += ["", f"**{result['dtype']}** (L {result['seq_len']}; GEMM ceiling {result['gemm_ceiling_size']}^3 before / after: "
                      f"{before:.0f} / {after_c:.0f} GFLOP/s)", ""]
        rows = []
        for name, rec in result["methods"].items():
            if rec["status"] != H.OK:
                rows.append([name, "not run: " + rec.get("reason", ""), "", "", "", ""])
                continue
            check = ("" if rec.get("kind") != "convret" else
                     f"{'pass' if rec['passed'] else 'FAIL'} ({rec['relative_max_error']:.0e})")
            label = f"{name} -> {rec['picked']}" if name == "auto" else name
            rows.append([label, _time(rec, "fwd"), _time(rec, "fwd_bwd"),
                         _ratio(rec, "fwd"), _ratio(rec, "fwd_bwd"), check])
        lines.append(H.markdown_table(["method", "fwd", "fwd+bwd", "vs best peer fwd", "fwd+bwd",
                                       "check vs float64 (rel. max error)"], rows))
        if result["backward_schedules"]:
            lines += ["", "Backward schedule (probe's tile GEMM): " + ", ".join(
                f"{name} {H.fmt_ms(rec['fwd_bwd_ms'])}" for name, rec in result["backward_schedules"].items())]
    return "\n".join(lines)


def _time(rec: dict, label: str) -> str:
    if f"{label}_ms" not in rec:
        return "n/a"
    return f"{H.fmt_ms(rec[f'{label}_ms'])} ({rec[f'{label}_gflops']:.0f} GFLOP/s, {100 * rec[f'{label}_gemm_share']:.0f}%)"


def _ratio(rec: dict, label: str) -> str:
    value = rec.get(f"{label}_vs_best_peer")
    return "" if value is None else f"{value:.2f}x"
