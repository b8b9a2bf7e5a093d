"""The cached prefill on CPU: ``cached_session_attention`` on the native kernel (``backend="cpu"``) beside the
SDPA loop (``backend="sdpa"``), in one process, at serving shapes.

One packed row of ``--conversations`` conversations, each ``--cached`` cached tokens followed by ``--new`` new
tokens (the new turn and the summary tokens: the query rows), per head config ``Hq/Hkv/D`` of ``--heads``.
Both backends are checked against each other first, then timed alternately (``--warmup`` untimed calls each,
then ``--reps`` rounds); medians of wall time and of process CPU time (the latter moves less on a loaded
machine).

    python bench/bench_cached_prefill_cpu.py --threads 1
    python bench/bench_cached_prefill_cpu.py --threads 1 --conversations 1 --cached 4000 --new 85
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from convret import SessionLayout
from convret.ops.session_attention.cached import cached_session_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def case(conversations: int, cached: int, new: int, heads: str, dtype: torch.dtype, seed: int = 0):
    q_heads, kv_heads, head_dim = (int(x) for x in heads.split("/"))
    length = cached + new
    layout = SessionLayout.from_segments([[(length, 0, 0)] * conversations], conversations * length)
    positions = torch.cat([torch.arange(c * length + cached, (c + 1) * length) for c in range(conversations)])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, positions.numel(), head_dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, layout.seq_len, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, layout.seq_len, head_dim, generator=g).to(dtype)
    return q, k, v, layout, positions.view(1, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32, help="conversations packed in the row")
    parser.add_argument("--cached", type=int, default=700, help="cached tokens per conversation")
    parser.add_argument("--new", type=int, default=85, help="new tokens (query rows) per conversation")
    parser.add_argument("--heads", default="4/2/32,16/4/128", help="comma-separated Hq/Hkv/D configs")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}; one row of {args.conversations} x ({args.cached} cached + "
          f"{args.new} new) tokens; medians of {args.reps} alternating rounds after {args.warmup} warm-up calls")
    print(f"{'Hq/Hkv/D':>10} {'dtype':>5} | {'cpu ms':>8} {'sdpa ms':>8} {'speedup':>7} | "
          f"{'cpu cpu-ms':>10} {'sdpa cpu-ms':>11} {'speedup':>7} | max |cpu - sdpa|")
    with torch.inference_mode():
        for heads in args.heads.split(","):
            for name in args.dtypes.split(","):
                q, k, v, layout, positions = case(args.conversations, args.cached, args.new, heads, DTYPES[name])
                run = {b: (lambda b=b: cached_session_attention(q, k, v, layout, positions, backend=b))
                       for b in ("cpu", "sdpa")}
                diff = float((run["cpu"]().float() - run["sdpa"]().float()).abs().max())
                for backend in run:
                    for _ in range(args.warmup):
                        run[backend]()
                wall: dict[str, list[float]] = {b: [] for b in run}
                cpu: dict[str, list[float]] = {b: [] for b in run}
                for _ in range(args.reps):
                    for backend, fn in run.items():
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[backend].append(1e3 * (time.perf_counter() - w0))
                        cpu[backend].append(1e3 * (time.process_time() - c0))
                m = {b: (statistics.median(wall[b]), statistics.median(cpu[b])) for b in run}
                print(f"{heads:>10} {name:>5} | {m['cpu'][0]:8.1f} {m['sdpa'][0]:8.1f} "
                      f"{m['sdpa'][0] / m['cpu'][0]:6.2f}x | {m['cpu'][1]:10.1f} {m['sdpa'][1]:11.1f} "
                      f"{m['sdpa'][1] / m['cpu'][1]:6.2f}x | {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
