"""The cached prefill on CPU: ``cached_session_attention`` on the native kernel (``backend="cpu"``) beside the
SDPA loop (``backend="sdpa"``), in one process, at serving shapes.

One packed row of ``--conversations`` conversations, each ``--cached`` cached tokens followed by ``--new`` new
tokens (the new turn and the summary tokens: the query rows), per head config ``Hq/Hkv/D`` of ``--heads``.
Both backends are checked against each other first, then timed alternately (``--warmup`` untimed calls each,
then ``--reps`` rounds); medians of wall time and of process CPU time (the latter moves less on a loaded
machine).

    python bench/bench_cached_prefill_cpu.py --threads 1
    python bench/bench_cached_prefill_cpu.py --threads 1 --conversations 1 --cached 4000 --new 85

``--encoder``: the same comparison end to end, through ``SessionEncoder`` on ``convret bench serve``'s tiny
Qwen2 (``--hidden``, ``--layers``; fp32): ``--conversations`` conversations grow turn by turn (turns of
``--turn-words`` words), all of them sent in one ``encode_requests`` batch per turn, once by an encoder whose
cached prefill runs on ``cpu`` and once by one on ``sdpa`` (alternating which goes first); past each of
``--lengths`` tokens per conversation, the medians of ``--reps`` turns. Both encoders' embeddings must agree.

    python bench/bench_cached_prefill_cpu.py --encoder --threads 1 --conversations 1
    python bench/bench_cached_prefill_cpu.py --encoder --threads 1 --conversations 16 --lengths 512,1024
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

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


def encoder_comparison(args) -> None:
    from convret.bench.serve import build_checkpoint, sample_words, turn_text
    from convret.data.records import Turn
    from convret.ops.session_attention.cached import OP
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.session_encoder import SessionEncoder
    from convret._dispatch import env_variable

    lengths = sorted(int(x) for x in args.lengths.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "ck", args.hidden, args.layers, lengths[-1] + 512)
        encoder = Encoder.from_checkpoint(checkpoint)
    heads = encoder.model.config.num_attention_heads, encoder.model.config.num_key_value_heads
    print(f"threads {torch.get_num_threads()}; tiny Qwen2 hidden {args.hidden}, {args.layers} layers, Hq/Hkv "
          f"{heads[0]}/{heads[1]}, fp32; {args.conversations} conversations per batch, turns of "
          f"{args.turn_words} words; medians of {args.reps} turns past each length")
    print(f"{'length':>7} {'tokens':>7} {'new/conv':>8} | {'cpu ms':>8} {'sdpa ms':>8} {'speedup':>7}")
    budget = 10 ** 6  # every batch one packed row
    encoders = {b: SessionEncoder(encoder, cache_mb=8192, token_budget=budget) for b in ("cpu", "sdpa")}
    words, rng = sample_words(), random.Random(0)
    convs = [[] for _ in range(args.conversations)]
    variable = env_variable(OP)
    previous = os.environ.get(variable)
    pending, current, turn = list(lengths), None, 0
    try:
        while pending or current is not None:
            for turns in convs:
                turns.append(Turn("user", turn_text(rng, words, args.turn_words)))
            times, vectors, infos = {}, {}, None
            order = ("cpu", "sdpa") if turn % 2 == 0 else ("sdpa", "cpu")
            for backend in order:
                os.environ[variable] = backend
                se = encoders[backend]
                requests = [se.session_request(f"c{i}", turns) for i, turns in enumerate(convs)]
                started = time.perf_counter()
                vectors[backend], infos = se.encode_requests(requests)
                times[backend] = 1e3 * (time.perf_counter() - started)
            diff = float(abs(vectors["cpu"] - vectors["sdpa"]).max())
            if diff > 1e-5:
                raise SystemExit(f"cpu and sdpa embeddings differ by {diff:.2e} at turn {turn}")
            tokens = min(info.total_tokens for info in infos)
            if current is None and tokens >= pending[0]:
                current = {"length": pending.pop(0), "cpu": [], "sdpa": [], "tokens": [], "new": []}
            if current is not None:
                for backend in times:
                    current[backend].append(times[backend])
                current["tokens"].append(tokens)
                current["new"].append(statistics.mean(info.computed_tokens for info in infos))
                if len(current["cpu"]) >= args.reps:
                    cpu, sdpa = statistics.median(current["cpu"]), statistics.median(current["sdpa"])
                    print(f"{current['length']:>7} {statistics.mean(current['tokens']):7.0f} "
                          f"{statistics.mean(current['new']):8.0f} | {cpu:8.1f} {sdpa:8.1f} {sdpa / cpu:6.2f}x",
                          flush=True)
                    current = None
            for turns in convs:
                turns.append(Turn("assistant", turn_text(rng, words, args.turn_words)))
            turn += 1
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32, help="conversations packed in the row (batch)")
    parser.add_argument("--cached", type=int, default=700, help="cached tokens per conversation")
    parser.add_argument("--new", type=int, default=85, help="new tokens (query rows) per conversation")
    parser.add_argument("--heads", default="4/2/32,16/4/128", help="comma-separated Hq/Hkv/D configs")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--encoder", action="store_true", help="end to end through SessionEncoder (docstring)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="--encoder: tokens per conversation")
    parser.add_argument("--turn-words", type=int, default=30, help="--encoder: words per turn")
    parser.add_argument("--hidden", type=int, default=128, help="--encoder: model hidden size")
    parser.add_argument("--layers", type=int, default=2, help="--encoder: model layers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder:
        encoder_comparison(args)
        return
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
