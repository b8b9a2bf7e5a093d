"""Which 16-bit tile GEMM the native CPU kernels should use, and what the backward schedules cost, measured
side by side in one process at the CSIT shape of bench_attention_cpu.py (B 2, Hq 16, Hkv 4, D 128, session
1024 + summary 3, response 384 + summary 3).

For each dtype and each forced tile GEMM (and the probe's own pick), forward and forward + backward medians
after warm-up, with the in-run torch.mm ceiling of the same dtype at 2048^3; then the fused and split backward
schedules. Prints the CPU's flags that matter for 16-bit GEMMs.

    python bench/bench_tile_gemm_cpu.py                 # bf16 and fp32, 3 reps
    python bench/bench_tile_gemm_cpu.py --dtypes bf16 --reps 5
    python bench/bench_tile_gemm_cpu.py --quick         # session 256 + 3, response 96 + 3 (docs/cpu_backend.md)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from convret import SessionLayout, _cpu_backend
from convret.ops.session_attention.cpu import session_attention_cpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16")


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    model = ""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{model}; " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_ceiling(dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    return 2 * 2048**3 / median_time(lambda: torch.mm(a, b), reps) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="session 256, response 96: a loaded machine's size")
    args = parser.parse_args(argv)
    if not _cpu_backend.native_available():
        raise SystemExit(f"native backend not available: {_cpu_backend.backend_info()['reason']}")
    print("CPU:", cpu_flags())
    print(f"threads: {torch.get_num_threads()}")
    session, response = (256, 99) if args.quick else (1024, 387)
    seq_len = session + 3 + response
    layout = SessionLayout.from_segments([[(session, 3, response)]] * 2, seq_len=seq_len)
    pairs = layout.dense_mask().sum().item()
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(2, 16, seq_len, 128, generator=generator).to(dtype).requires_grad_()
        k = torch.randn(2, 4, seq_len, 128, generator=generator).to(dtype).requires_grad_()
        v = torch.randn(2, 4, seq_len, 128, generator=generator).to(dtype).requires_grad_()
        grad_out = torch.randn(q.shape, generator=generator).to(dtype)

        def forward():
            with torch.no_grad():
                session_attention_cpu(q, k, v, layout)

        def forward_backward():
            out = session_attention_cpu(q, k, v, layout)
            torch.autograd.grad(out, (q, k, v), grad_out)

        choices = ["fp32 sgemm"] if dtype == torch.float32 else ["mkl", "onednn", "upcast", "packed", "auto"]
        for choice in choices:
            if dtype != torch.float32:
                try:
                    report = _cpu_backend.set_tile_gemm(dtype, choice)
                except RuntimeError as error:  # the packed path where oneDNN has no 16-bit ukernel
                    print(f"{name} {choice}: {str(error).splitlines()[0]}")
                    continue
            ceiling = gemm_ceiling(dtype, args.reps)
            fwd = median_time(forward, args.reps)
            fwd_bwd = median_time(forward_backward, args.reps)
            fwd_rate, fwd_bwd_rate = 4 * 128 * pairs * 16 / fwd / 1e9, 14 * 128 * pairs * 16 / fwd_bwd / 1e9
            label = choice if choice != "auto" else "auto -> " + report
            print(f"{name} {label}: fwd {fwd * 1e3:.0f} ms ({fwd_rate:.0f} GFLOP/s, {fwd_rate / ceiling:.0%} of "
                  f"torch.mm {ceiling:.0f}), fwd+bwd {fwd_bwd * 1e3:.0f} ms ({fwd_bwd_rate:.0f} GFLOP/s, "
                  f"{fwd_bwd_rate / ceiling:.0%})")
        for schedule in ("fused", "split"):
            os.environ[_cpu_backend.ENV_BACKWARD] = schedule
            fwd_bwd = median_time(forward_backward, args.reps)
            print(f"{name} backward schedule {schedule}: fwd+bwd {fwd_bwd * 1e3:.0f} ms")
        os.environ.pop(_cpu_backend.ENV_BACKWARD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
