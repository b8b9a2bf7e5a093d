"""InfoNCE on CPU, fp32, forward + backward: naive ``cross_entropy(q @ p.T / tau)`` vs ``convret.info_nce``.

Time: both methods side by side in this process, interleaved, medians after a warm-up.
Peak memory: one fresh subprocess per method; ``VmHWM`` after the step minus ``VmRSS`` once the inputs exist
(so it counts everything the step allocates, gradients included).

    python bench/bench_info_nce.py                      # Q=8192, group_size=5, D=768: time + memory table
    python bench/bench_info_nce.py --big                # also Q=32768, P=163840 for convret (memory + time)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import convret
from convret.bench import harness as H

TEMPERATURE = 0.01


def make_inputs(num_queries: int, group_size: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(num_queries, dim, generator=gen)
    passages = torch.randn(num_queries * group_size, dim, generator=gen)
    for t in (queries, passages):  # L2-normalise in place: no input-sized temporaries before the measurement
        t.div_(t.norm(dim=-1, keepdim=True))
    return queries.requires_grad_(), passages.requires_grad_()


def naive_step(queries, passages, group_size):
    labels = torch.arange(queries.shape[0]) * group_size
    loss = F.cross_entropy(queries @ passages.T / TEMPERATURE, labels)
    loss.backward()
    return loss.detach()


def convret_step(queries, passages, group_size):
    loss = convret.info_nce(queries, passages, TEMPERATURE, group_size=group_size, backend="cpu")
    loss.backward()
    return loss.detach()


METHODS = {"naive": naive_step, "convret-cpu": convret_step}


def measure_memory(method: str, num_queries: int, group_size: int, dim: int) -> dict:
    """Run in a fresh process: one step of ``method``; bytes of peak RSS above the inputs."""
    queries, passages = make_inputs(num_queries, group_size, dim)
    H.reset_peak_rss()
    base_kib = H.rss_bytes() // 1024
    start = time.perf_counter()
    loss = METHODS[method](queries, passages, group_size)
    seconds = time.perf_counter() - start
    peak_kib = H.peak_rss_bytes() // 1024
    return {"method": method, "peak_above_inputs_bytes": (peak_kib - base_kib) * 1024, "seconds": seconds,
            "loss": loss.item()}


def memory_in_subprocess(method: str, num_queries: int, group_size: int, dim: int) -> dict:
    command = [sys.executable, __file__, "--measure-memory", method, "--queries", str(num_queries),
               "--group-size", str(group_size), "--dim", str(dim)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_side_by_side(num_queries: int, group_size: int, dim: int, repeats: int) -> dict[str, list[float]]:
    queries, passages = make_inputs(num_queries, group_size, dim)
    warm = torch.randn(2048, 2048)
    for _ in range(5):  # the first GEMMs of a process run at half speed
        warm @ warm
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    losses = {}
    for repeat in range(repeats + 1):  # round 0 is the warm-up of each method
        for name, step in METHODS.items():
            queries.grad = passages.grad = None
            start = time.perf_counter()
            losses[name] = step(queries, passages, group_size).item()
            if repeat > 0:
                times[name].append(time.perf_counter() - start)
    print(f"losses: {losses}", file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="also run Q=32768, P=163840 with convret-cpu")
    parser.add_argument("--measure-memory", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args.queries, args.group_size, args.dim)))
        return

    shape = f"Q={args.queries}, P={args.queries * args.group_size}, D={args.dim}"
    print(f"command: python bench/bench_info_nce.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, tau={TEMPERATURE}, {shape}\n")
    memory = {name: memory_in_subprocess(name, args.queries, args.group_size, args.dim) for name in METHODS}
    times = time_side_by_side(args.queries, args.group_size, args.dim, args.repeats)

    naive_time = statistics.median(times["naive"])
    naive_peak = memory["naive"]["peak_above_inputs_bytes"]
    print("| method | fwd+bwd median (s) | runs (s) | time vs naive | peak memory above inputs | memory vs naive |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        median = statistics.median(times[name])
        peak = memory[name]["peak_above_inputs_bytes"]
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {median:.2f} | {runs} | {median / naive_time:.2f}x | {peak / 2**20:.0f} MiB | "
              f"{100 * peak / naive_peak:.1f}% |")

    if args.big:
        big = memory_in_subprocess("convret-cpu", 32768, 5, args.dim)
        print(f"\nconvret-cpu, Q=32768, P=163840, D={args.dim}: fwd+bwd {big['seconds']:.1f} s, peak memory above "
              f"inputs {big['peak_above_inputs_bytes'] / 2**20:.0f} MiB, loss {big['loss']:.4f} (naive logits and "
              f"their gradient alone: {2 * 32768 * 163840 * 4 / 1e9:.0f} GB)")


if __name__ == "__main__":
    main()
