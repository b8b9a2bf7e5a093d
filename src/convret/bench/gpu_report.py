"""``convret bench gpu-report``: what the Triton kernels will do on an A100 / H100, without a GPU.

1. Ahead-of-time compile of every kernel at its default configs for sm_80 (A100) and sm_90 (H100), with
   registers, shared memory, stack / local memory (spills) read off each cubin by ``cuobjdump`` (the same
   compile as ``python -m convret.aot``).
2. An occupancy estimate per kernel and target: resident blocks per SM from the register file (65536
   32-bit registers, allocated per warp in units of 256), shared memory (164 KiB per SM on sm_80, 228 KiB on
   sm_90, 1 KiB reserved per block), and the warp (64) and block (32) limits; occupancy = resident warps / 64.
   An estimate: it ignores the register-bank and L1 split details of the real scheduler.
3. Tile-skip fractions of the session-attention kernels at their default tiles, for typical CSIT layouts
   (one CSIT sample per row at session lengths 256 .. 8192, response 384, t = 3; and a packed 4096-token
   row of one CSIT sample and passages): skipped tiles are never loaded, full tiles run without masking.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from convret import SessionLayout

from . import harness as H

NAME = "gpu-report"
# per-SM limits: registers, shared memory usable by blocks, max warps, max blocks
SM_LIMITS = {80: {"registers": 65536, "shared_bytes": 167936, "warps": 64, "blocks": 32},
             90: {"registers": 65536, "shared_bytes": 233472, "warps": 64, "blocks": 32}}
RESERVED_SHARED_PER_BLOCK = 1024


def occupancy(registers: int, shared_bytes: int, num_warps: int, capability: int) -> dict[str, Any]:
    """Resident blocks per SM and the occupancy they give, with the limit that binds."""
    limits = SM_LIMITS[capability]
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (limits["registers"] // per_warp) // num_warps
    by_shared = limits["shared_bytes"] // (shared_bytes + RESERVED_SHARED_PER_BLOCK) if shared_bytes else limits["blocks"]
    by_warps = limits["warps"] // num_warps
    candidates = {"registers": by_registers, "shared memory": by_shared, "warps": by_warps, "blocks": limits["blocks"]}
    blocks = min(candidates.values())
    limiter = min(candidates, key=candidates.get)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / limits["warps"], "limited_by": limiter}


def _compile_job(job: tuple[int, int]):
    from convret import aot

    index, capability = job
    return aot.compile_spec(aot.kernel_specs()[index], capability)


def compile_report(name_filter: str | None, max_workers: int) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from convret import aot

    specs = aot.kernel_specs()
    indices = [i for i, spec in enumerate(specs) if not name_filter or any(f in spec["name"] for f in name_filter.split("|"))]
    jobs = [(i, cap) for i in indices for cap in aot.TARGETS]
    context = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(max_workers, mp_context=context, initializer=aot._compiler_process) as pool:
        for (index, cap), usage in zip(jobs, H.progress(pool.map(_compile_job, jobs), "AOT compile", total=len(jobs))):
            spec = specs[index]
            rows.append({"kernel": usage.name, "target": f"sm_{cap}", "registers": usage.registers,
                         "shared_bytes": usage.shared_bytes, "stack_bytes": usage.stack_bytes,
                         "local_bytes": usage.local_bytes, "spills": usage.spills, "num_warps": spec["num_warps"],
                         "num_stages": spec["num_stages"],
                         **occupancy(usage.registers, usage.shared_bytes, spec["num_warps"], cap)})
    return rows


def tile_report(sessions: list[int], response: int, summary: int, packed_len: int) -> list[dict[str, Any]]:
    from convret.kernels.session_attention import default_configs

    from .tile_stats import tile_fractions

    layouts = {f"session {s} / response {response}": (s, SessionLayout.from_segments(
        [[(s, summary, response + summary)]], s + 2 * summary + response)) for s in sessions}
    if packed_len:
        row = [(1024, summary, response + summary)]
        used = sum(row[0])
        while used + 384 + summary <= packed_len:
            row.append((384, summary, 0))
            used += 384 + summary
        layouts[f"packed row {packed_len}"] = (None, SessionLayout.from_segments([row], packed_len))
    rows = []
    for name, (session, layout) in layouts.items():
        visible = layout.dense_mask().float().mean().item()
        for dtype_name, dtype in (("fp16/bf16", torch.float16), ("fp32", torch.float32)):
            for head_dim in (64, 128):
                for kernel, (block_m, block_n, _, _) in default_configs(head_dim, dtype).items():
                    rows.append({"layout": name, "session": session, "seq_len": layout.seq_len,
                                 "masked_fraction": 1 - visible, "dtype": dtype_name, "head_dim": head_dim,
                                 "kernel": kernel, "block_m": block_m, "block_n": block_n,
                                 **tile_fractions(layout, block_m, block_n)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default=None,
                        help="'|'-separated substrings: compile only the kernels whose name contains one "
                             "(e.g. 'session_attn_fwd'); default all")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (2)")
    parser.add_argument("--no-compile", action="store_true", help="tile statistics only")
    parser.add_argument("--sessions", default="256,512,1024,2048,4096,8192", help="session lengths of the tile sweep")


def run(args, argv: list[str]) -> int:
    sessions = [int(x) for x in args.sessions.split(",")]
    if args.smoke:
        args.kernels = args.kernels or "session_attn_fwd[fp16,d64"
        sessions = [256, 1024]
    elif args.quick:
        args.kernels = args.kernels or "[fp16,d128|cross_entropy_rows[fp16,grad=1|info_nce_fwd[fp16"
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "sm_limits": SM_LIMITS,
                               "kernel_filter": args.kernels, "compile": [], "tiles": []}
    if not args.no_compile:
        payload["compile"] = compile_report(args.kernels, args.workers)
    payload["tiles"] = tile_report(sessions, 384, 3, 4096)
    payload["passed"] = not any(row["spills"] for row in payload["compile"])
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", ""]
    if payload["compile"]:
        rows = [[r["kernel"], r["target"], r["num_warps"], r["registers"], f"{r['shared_bytes'] / 1024:.0f} KiB",
                 f"{r['stack_bytes']} / {r['local_bytes']} B", "YES" if r["spills"] else "no",
                 f"{r['blocks_per_sm']} blocks, {100 * r['occupancy']:.0f}% ({r['limited_by']})"]
                for r in payload["compile"]]
        lines += [f"AOT compile ({len(rows)} builds, {sum(r['spills'] for r in payload['compile'])} with spills; "
                  "occupancy is an estimate from registers, shared memory and warp limits):", "",
                  H.markdown_table(["kernel", "target", "warps", "registers", "shared", "stack / local", "spills",
                                    "occupancy estimate"], rows)]
    else:
        lines.append("AOT compile: not run (--no-compile)")
    lines += ["", "Tile-skip fractions at the default tiles (D = 128, fp16/bf16 tiles; every case in the JSON):", ""]
    rows = [[r["layout"], r["seq_len"], f"{100 * r['masked_fraction']:.0f}%", r["kernel"],
             f"{r['block_m']} x {r['block_n']}", r["tiles"], f"{100 * r['skipped_fraction']:.0f}%", r["full"],
             r["partial"], f"{100 * r['skipped_beyond_causal_fraction']:.0f}%"]
            for r in payload["tiles"] if r["head_dim"] == 128 and r["dtype"] == "fp16/bf16"]
    lines.append(H.markdown_table(["layout", "L", "masked pairs", "kernel", "tile", "tiles", "skipped", "full",
                                   "partial", "skipped beyond causality"], rows))
    return "\n".join(lines)


def make_plots(payload: dict, out_dir) -> list:
    series: dict[str, list] = {}
    for r in payload["tiles"]:
        if r["session"] is None:
            continue
        key = f"{r['kernel']} {r['dtype']} D={r['head_dim']} ({r['block_m']}x{r['block_n']})"
        series.setdefault(key, []).append((r["session"], 100 * r["skipped_fraction"]))
    return [H.plot_lines(f"{out_dir}/gpu_report_tile_skip.png", series, "session length (tokens)",
                         "tiles skipped (%)", "session-attention tiles skipped, CSIT rows (response 384, t = 3)",
                         logy=False)]
