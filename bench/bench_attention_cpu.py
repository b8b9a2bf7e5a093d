"""Benchmark of ``backend="cpu"`` session attention against the CPU peers (issue 3), all in one process.

Peers: dense-mask eager (Hugging Face's eager path: repeat_kv, matmul, additive float mask, fp32 softmax,
matmul) and SDPA with a dense bool mask (both from convret.baselines), the hand-written SDPA decomposition (causal SDPA per session segment and
per [summary | response], enable_gqa=True; convret's own fallback), and torch.compile(flex_attention) with a
BlockMask (forward only on CPU). Times are medians after warm-up; the GEMM ceiling is the best of several
warmed-up 2048^3 matmuls measured in the same run, just before the timings it judges. Useful work: 4 * D flops per visible (query, key) pair per query head
forward, 14 * D forward + backward.

    python bench/bench_attention_cpu.py                      # both layouts, fp32 and bf16, + peak memory
    python bench/bench_attention_cpu.py --layouts csit --dtypes fp32 --reps 5
    python bench/bench_attention_cpu.py --quick              # small shapes, for iterating on the kernel

The full sweep (session 256 .. 8192, response 128 .. 1024, JSON and plots) is ``convret bench attention``;
both take their timing and memory helpers from convret.bench.harness.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import convret
from convret import SessionLayout
from convret.ops.session_attention.cpu import fallback_session_attention, session_attention_cpu
from convret.baselines import additive_mask, dense_mask_eager_attention, sdpa_dense_mask_attention
from convret.bench import harness as H

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 16, 4, 128
SUMMARY = 3
CSIT_SAMPLE = (1024, SUMMARY, 384 + SUMMARY)
PASSAGE = (384, SUMMARY, 0)
PACKED_ROW_LEN = 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_layout(name: str, batch: int = BATCH) -> SessionLayout:
    if name == "csit":  # one CSIT sample per row
        return SessionLayout.from_segments([[CSIT_SAMPLE]] * batch, seq_len=sum(CSIT_SAMPLE))
    if name == "packed":  # one CSIT sample and six passages per 4096-token row
        return SessionLayout.from_segments([[CSIT_SAMPLE] + [PASSAGE] * 6] * batch, seq_len=PACKED_ROW_LEN)
    if name == "quick":
        return SessionLayout.from_segments([[(256, SUMMARY, 96 + SUMMARY)]] * batch, seq_len=358)
    if name.startswith("session"):  # session<N>: one sample with an N-token session
        session = int(name[len("session"):])
        return SessionLayout.from_segments([[(session, SUMMARY, 384 + SUMMARY)]] * batch, seq_len=session + 390)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------- peers
def dense_eager_gib(layout: SessionLayout) -> float:
    """Rough fwd+bwd peak of the dense-mask eager peer: about four live fp32 [B, Hq, L, L] tensors."""
    return 4 * layout.batch_size * Q_HEADS * layout.seq_len**2 * 4 / 2**30


def make_peers(layout: SessionLayout, dtype: torch.dtype, with_flex: bool,
               max_dense_gib: float) -> dict[str, tuple[Callable, bool] | None]:
    """name -> (fn(q, k, v), has_backward), or None for a peer skipped to stay within the memory budget."""
    scale = HEAD_DIM**-0.5
    allowed = layout.dense_mask().unsqueeze(1)
    peers: dict[str, tuple[Callable, bool] | None] = {"dense-mask eager": None}
    if dense_eager_gib(layout) <= max_dense_gib:
        additive = additive_mask(layout, dtype)
        peers["dense-mask eager"] = (lambda q, k, v: dense_mask_eager_attention(q, k, v, additive, scale), True)
    peers["SDPA + dense bool mask"] = (lambda q, k, v: sdpa_dense_mask_attention(q, k, v, allowed, scale), True)
    peers["SDPA decomposition"] = (lambda q, k, v: fallback_session_attention(q, k, v, layout, scale), True)
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask_start = layout.mask_start

        def session_mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < mask_start[b, kv_idx])

        block_mask = create_block_mask(session_mask, layout.batch_size, None, layout.seq_len, layout.seq_len,
                                       device="cpu", _compile=True)
        compiled_flex = torch.compile(flex_attention, dynamic=False)
        peers["compiled FlexAttention"] = (
            lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True), False)
    peers["convret backend='cpu'"] = (lambda q, k, v: session_attention_cpu(q, k, v, layout, scale), True)
    return peers


# ------------------------------------------------------------------------------------------------ timing
def median_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    return H.median_ms(fn, reps, warmup)


def gemm_ceiling_gflops(dtype: torch.dtype, reps: int) -> float:
    """Best of ``2 * reps`` warmed-up 2048^3 matmuls (see convret.bench.harness.gemm_ceiling)."""
    return H.gemm_ceiling(dtype, "cpu", size=2048, reps=2 * reps)["gflops"]


def visible_pairs(layout: SessionLayout) -> int:
    return int(layout.dense_mask().sum())


def run_layout(layout_name: str, dtype_names: list[str], reps: int, warmup: int, with_flex: bool,
               max_dense_gib: float) -> dict:
    layout = make_layout(layout_name)
    pairs = visible_pairs(layout)
    fwd_flops = 4 * HEAD_DIM * pairs * Q_HEADS
    bwd_flops = 14 * HEAD_DIM * pairs * Q_HEADS
    results = {"layout": layout_name, "seq_len": layout.seq_len, "pairs": pairs,
               "masked_fraction": 1 - pairs / (layout.batch_size * layout.seq_len**2),
               "fwd_gflop": fwd_flops / 1e9, "dtypes": {}}
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        q = torch.randn(BATCH, Q_HEADS, layout.seq_len, HEAD_DIM, dtype=dtype)
        k = torch.randn(BATCH, KV_HEADS, layout.seq_len, HEAD_DIM, dtype=dtype)
        v = torch.randn(BATCH, KV_HEADS, layout.seq_len, HEAD_DIM, dtype=dtype)
        grad = torch.randn_like(q)
        ceiling = gemm_ceiling_gflops(dtype, reps)
        row = {"gemm_gflops": ceiling, "impls": {}}
        for name, peer in make_peers(layout, dtype, with_flex, max_dense_gib).items():
            if peer is None:
                row["impls"][name] = None
                print(f"  [{layout_name} {dtype_name}] {name}: skipped (needs ~{dense_eager_gib(layout):.0f} GiB)",
                      file=sys.stderr, flush=True)
                continue
            fn, has_backward = peer
            with torch.no_grad():
                fwd_ms = median_ms(lambda: fn(q, k, v), reps, warmup)
            bwd_ms = None
            if has_backward:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

                def step():
                    fn(qg, kg, vg).backward(grad)
                    qg.grad = kg.grad = vg.grad = None

                bwd_ms = median_ms(step, reps, warmup)
            row["impls"][name] = {
                "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms,
                "fwd_gemm_share": fwd_flops / (fwd_ms * 1e-3) / 1e9 / ceiling,
                "fwd_bwd_gemm_share": None if bwd_ms is None else bwd_flops / (bwd_ms * 1e-3) / 1e9 / ceiling,
            }
            print(f"  [{layout_name} {dtype_name}] {name}: fwd {fwd_ms:.1f} ms, fwd+bwd "
                  f"{'n/a' if bwd_ms is None else f'{bwd_ms:.1f} ms'}", file=sys.stderr, flush=True)
        results["dtypes"][dtype_name] = row
    return results


# ------------------------------------------------------------------------- single-thread CPU-time share
def cpu_time_shares(layout_names: list[str], dtype_names: list[str], reps: int) -> str:
    """backend='cpu' alone on one thread, timed in process CPU time (what the other tenants of a shared
    machine disturb least), on one GQA group (B=1, Hq=4, Hkv=1) against a one-thread 2048^3 GEMM."""
    torch.set_num_threads(1)

    def cpu_ms(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.process_time()
            fn()
            times.append((time.process_time() - start) * 1e3)
        return statistics.median(times)

    lines = ["| layout | dtype | GEMM (1 thread) | fwd | fwd+bwd |", "|---|---|---|---|---|"]
    for layout_name in layout_names:
        layout = make_layout(layout_name, batch=1)
        pairs = visible_pairs(layout)
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
            gflops = 2 * 2048**3 / min(cpu_ms(lambda: torch.matmul(a, b)) for _ in range(2)) / 1e6
            q = torch.randn(1, 4, layout.seq_len, HEAD_DIM, dtype=dtype, requires_grad=True)
            k = torch.randn(1, 1, layout.seq_len, HEAD_DIM, dtype=dtype, requires_grad=True)
            v = torch.randn(1, 1, layout.seq_len, HEAD_DIM, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(q)
            with torch.no_grad():
                fwd = cpu_ms(lambda: session_attention_cpu(q, k, v, layout))
            fwd_bwd = cpu_ms(lambda: session_attention_cpu(q, k, v, layout).backward(grad))
            share = lambda flops_per_pair, ms: 100 * flops_per_pair * HEAD_DIM * pairs * 4 / (ms * 1e6) / gflops
            lines.append(f"| {layout_name} | {dtype_name} | {gflops:.0f} GFLOP/s | {fwd:.1f} ms ({share(4, fwd):.0f}%) "
                         f"| {fwd_bwd:.1f} ms ({share(14, fwd_bwd):.0f}%) |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ peak memory
def peak_memory_child(impl: str, layout_name: str) -> None:
    """Runs one forward + backward in this (fresh) process and prints VmHWM, whole process and above the
    RSS it had with inputs allocated."""
    layout = make_layout(layout_name, batch=1)
    torch.manual_seed(0)
    q = torch.randn(1, Q_HEADS, layout.seq_len, HEAD_DIM, requires_grad=True)
    k = torch.randn(1, KV_HEADS, layout.seq_len, HEAD_DIM, requires_grad=True)
    v = torch.randn(1, KV_HEADS, layout.seq_len, HEAD_DIM, requires_grad=True)
    grad = torch.randn_like(q)
    scale = HEAD_DIM**-0.5
    if impl == "eager":
        def fn():  # the additive mask is built per call, as the model builds it per forward
            return dense_mask_eager_attention(q, k, v, additive_mask(layout, torch.float32), scale)
    else:
        def fn():
            return session_attention_cpu(q, k, v, layout, scale)
    base_kib = H.rss_bytes() // 1024
    fn().backward(grad)
    peak_kib = H.peak_rss_bytes() // 1024
    print(json.dumps({"impl": impl, "peak_mib": peak_kib / 1024, "above_inputs_mib": (peak_kib - base_kib) / 1024}))


def measure_peak_memory(layout_name: str) -> dict:
    results = {}
    for impl in ("cpu", "eager"):
        out = subprocess.run([sys.executable, __file__, "--peak-child", impl, "--peak-layout", layout_name],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------------------------- reporting
def format_tables(all_results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    info = convret.backend_info()
    lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backend='cpu' runs "
                 f"{info['implementation']} ({info['blas']}); load average at the end "
                 + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    for result in all_results:
        dtypes = list(result["dtypes"])
        lines += ["", f"**{result['layout']}** layout: B={BATCH}, Hq={Q_HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, "
                  f"L={result['seq_len']}, {100 * result['masked_fraction']:.0f}% of L^2 pairs masked, "
                  f"{result['fwd_gflop']:.1f} GFLOP useful forward work", ""]
        header = "| |" + "|".join(f" {d} fwd | {d} fwd+bwd " for d in dtypes) + "|"
        lines += [header, "|---|" + "---|---|" * len(dtypes)]
        names = list(next(iter(result["dtypes"].values()))["impls"])
        for name in names:
            cells = []
            for d in dtypes:
                r = result["dtypes"][d]["impls"][name]
                if r is None:
                    cells += [f"skipped (~{4 * result['seq_len']**2 * BATCH * Q_HEADS * 4 / 2**30:.0f} GiB)"] * 2
                    continue
                cells.append(f"{r['fwd_ms']:.0f} ms ({100 * r['fwd_gemm_share']:.0f}%)")
                cells.append("n/a" if r["fwd_bwd_ms"] is None
                             else f"{r['fwd_bwd_ms']:.0f} ms ({100 * r['fwd_bwd_gemm_share']:.0f}%)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        cells = []
        for d in dtypes:
            impls = result["dtypes"][d]["impls"]
            ours = impls["convret backend='cpu'"]
            peers = {n: r for n, r in impls.items() if n != "convret backend='cpu'" and r is not None}
            best_fwd = min(r["fwd_ms"] for r in peers.values())
            best_bwd = min(r["fwd_bwd_ms"] for r in peers.values() if r["fwd_bwd_ms"] is not None)
            cells += [f"{best_fwd / ours['fwd_ms']:.2f}x", f"{best_bwd / ours['fwd_bwd_ms']:.2f}x"]
        lines.append("| speed-up of 'cpu' over the best peer | " + " | ".join(cells) + " |")
        lines.append("| GEMM ceiling (2048^3 matmul) | " + " | ".join(
            f"{result['dtypes'][d]['gemm_gflops']:.0f} GFLOP/s | " for d in dtypes) + "|")
    lines += ["", "(x%) = useful GFLOP/s as a share of the GEMM ceiling measured in the same run (best 2048^3 "
              "matmul); medians of the timed runs after warm-up."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="csit,packed")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-layout", default="session4096")
    parser.add_argument("--max-dense-gib", type=float, default=6.0,
                        help="skip the dense-mask eager peer where its fwd+bwd needs more (default 6 GiB)")
    parser.add_argument("--quick", action="store_true", help="small layout, no flex, no memory")
    parser.add_argument("--cpu-time", action="store_true",
                        help="only backend='cpu', one thread, process CPU time vs a one-thread GEMM")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--peak-layout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_memory_child(args.peak_child, args.peak_layout)
        return
    if args.quick:
        args.layouts, args.no_flex, args.no_memory = "quick", True, True
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    if args.cpu_time:
        print(f"Command: `{command}`\n\n" + cpu_time_shares(args.layouts.split(","), args.dtypes.split(","), args.reps))
        return
    results = [run_layout(name, args.dtypes.split(","), args.reps, args.warmup, not args.no_flex, args.max_dense_gib)
               for name in args.layouts.split(",")]
    report = format_tables(results, command)
    memory = None
    if not args.no_memory:
        memory = measure_peak_memory(args.memory_layout)
        cpu, eager = memory["cpu"], memory["eager"]
        report += (
            f"\n\nPeak memory, fp32 forward + backward, B=1, {args.memory_layout} (L={make_layout(args.memory_layout).seq_len}),"
            " separate processes, VmHWM:\n\n| | whole process | above inputs |\n|---|---|---|\n"
            f"| dense-mask eager | {eager['peak_mib']:.0f} MiB | {eager['above_inputs_mib']:.0f} MiB |\n"
            f"| convret backend='cpu' | {cpu['peak_mib']:.0f} MiB | {cpu['above_inputs_mib']:.0f} MiB |\n"
            f"| ratio eager / cpu | {eager['peak_mib'] / cpu['peak_mib']:.1f}x | "
            f"{eager['above_inputs_mib'] / cpu['above_inputs_mib']:.1f}x |"
        )
    print(report)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": command, "results": results, "memory": memory}, out, indent=1)


if __name__ == "__main__":
    main()
