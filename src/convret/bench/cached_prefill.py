"""``convret bench cached-prefill``: the cached prefill on CPU, the native kernel beside the SDPA loop.

1. Attention alone: ``cached_session_attention`` with ``backend="cpu"`` (convret's C++ kernel) and
   ``backend="sdpa"`` (PyTorch SDPA per packed sample), in one process, on one packed row of
   ``--conversations`` conversations of ``--cached`` cached + ``--new`` new tokens each (the new turn and the
   summary tokens are the query rows), per head config ``Hq/Hkv/D`` of ``--heads`` and dtype of ``--dtypes``.
   The two are compared first (the float64 oracle checks them in the test suite), then timed alternately:
   ``--warmup`` untimed calls each, ``--reps`` rounds; medians of wall time and of process CPU time (the latter
   moves less on a loaded machine).
2. End to end (``--encoder-lengths``, empty to skip): two ``SessionEncoder`` s on ``convret bench serve``'s
   tiny Qwen2 (fp32), one whose cached prefill runs on ``cpu`` and one on ``sdpa``, encode the same
   ``--encoder-conversations`` growing conversations (one ``encode_requests`` per turn, the order alternating);
   past each length, the medians of ``--reps`` turns. Their embeddings must agree within 1e-5 (else exit 1).
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import harness as H

NAME = "cached-prefill"
TOLERANCE = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser) -> None:
    parser.add_argument("--conversations", type=int, default=32, help="conversations packed in the row (32)")
    parser.add_argument("--cached", type=int, default=700, help="cached tokens per conversation (700)")
    parser.add_argument("--new", type=int, default=85, help="new tokens (query rows) per conversation (85)")
    parser.add_argument("--heads", default="4/2/32,16/4/128", help="comma-separated Hq/Hkv/D configs")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--encoder-lengths", default="1024,4096",
                        help="end to end: tokens per conversation to report ('' skips the end-to-end part)")
    parser.add_argument("--encoder-conversations", type=int, default=1, help="end to end: conversations (1)")
    parser.add_argument("--turn-words", type=int, default=30, help="end to end: words per turn (30)")


def attention_case(conversations: int, cached: int, new: int, heads: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v, layout, query_positions of one packed row: each conversation's last ``new`` tokens query."""
    from convret import SessionLayout

    q_heads, kv_heads, head_dim = (int(x) for x in heads.split("/"))
    length = cached + new
    layout = SessionLayout.from_segments([[(length, 0, 0)] * conversations], conversations * length)
    positions = torch.cat([torch.arange(c * length + cached, (c + 1) * length) for c in range(conversations)])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, positions.numel(), head_dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, layout.seq_len, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, layout.seq_len, head_dim, generator=g).to(dtype)
    return q, k, v, layout, positions.view(1, -1)


def attention(args) -> list[dict]:
    from convret.ops.session_attention.cached import cached_session_attention

    rows = []
    with torch.inference_mode():
        for heads in args.heads.split(","):
            for name in args.dtypes.split(","):
                q, k, v, layout, positions = attention_case(args.conversations, args.cached, args.new, heads,
                                                            DTYPES[name])
                run = {b: (lambda b=b: cached_session_attention(q, k, v, layout, positions, backend=b))
                       for b in ("cpu", "sdpa")}
                diff = float((run["cpu"]().float() - run["sdpa"]().float()).abs().max())
                for fn in run.values():
                    for _ in range(args.warmup):
                        fn()
                wall: dict[str, list[float]] = {b: [] for b in run}
                cpu: dict[str, list[float]] = {b: [] for b in run}
                for _ in range(args.reps):
                    for backend, fn in run.items():
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[backend].append(1e3 * (time.perf_counter() - w0))
                        cpu[backend].append(1e3 * (time.process_time() - c0))
                record = {"heads": heads, "dtype": name, "max_abs_diff": diff}
                for b in run:
                    record[f"{b}_ms"] = statistics.median(wall[b])
                    record[f"{b}_cpu_ms"] = statistics.median(cpu[b])
                record["speedup"] = record["sdpa_ms"] / record["cpu_ms"]
                record["cpu_time_speedup"] = record["sdpa_cpu_ms"] / max(record["cpu_cpu_ms"], 1e-9)
                rows.append(record)
    return rows


def end_to_end(args, lengths: list[int]) -> list[dict]:
    from convret._dispatch import env_variable
    from convret.bench.serve import build_checkpoint, sample_words, turn_text
    from convret.data.records import Turn
    from convret.ops.session_attention.cached import OP
    from convret.retrieval.encoder import Encoder
    from convret.retrieval.session_encoder import SessionEncoder

    with tempfile.TemporaryDirectory(prefix="convret-bench-cached-") as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "ck", 128, 2, lengths[-1] + 512)
        encoder = Encoder.from_checkpoint(checkpoint)
    encoders = {b: SessionEncoder(encoder, cache_mb=8192, token_budget=10**6) for b in ("cpu", "sdpa")}
    words, rng = sample_words(), random.Random(0)
    conversations: list[list[Turn]] = [[] for _ in range(args.encoder_conversations)]
    variable = env_variable(OP)
    previous = os.environ.get(variable)
    pending, current, turn, rows = list(lengths), None, 0, []
    try:
        while pending or current is not None:
            for turns in conversations:
                turns.append(Turn("user", turn_text(rng, words, args.turn_words)))
            times, vectors, infos = {}, {}, []
            for backend in (("cpu", "sdpa") if turn % 2 == 0 else ("sdpa", "cpu")):
                os.environ[variable] = backend
                se = encoders[backend]
                requests = [se.session_request(f"c{i}", turns) for i, turns in enumerate(conversations)]
                started = time.perf_counter()
                vectors[backend], infos = se.encode_requests(requests)
                times[backend] = 1e3 * (time.perf_counter() - started)
            diff = float(abs(vectors["cpu"] - vectors["sdpa"]).max())
            tokens = min(info.total_tokens for info in infos)
            if current is None and tokens >= pending[0]:
                current = {"target": pending.pop(0), "cpu": [], "sdpa": [], "tokens": [], "computed": [],
                           "max_abs_diff": 0.0}
            if current is not None:
                for backend, ms in times.items():
                    current[backend].append(ms)
                current["tokens"].append(tokens)
                current["computed"].append(statistics.mean(info.computed_tokens for info in infos))
                current["max_abs_diff"] = max(current["max_abs_diff"], diff)
                if len(current["cpu"]) >= args.reps:
                    cpu_ms, sdpa_ms = statistics.median(current["cpu"]), statistics.median(current["sdpa"])
                    rows.append({"target": current["target"], "mean_tokens": statistics.mean(current["tokens"]),
                                 "mean_computed": statistics.mean(current["computed"]), "cpu_ms": cpu_ms,
                                 "sdpa_ms": sdpa_ms, "speedup": sdpa_ms / cpu_ms,
                                 "max_abs_diff": current["max_abs_diff"]})
                    current = None
            for turns in conversations:
                turns.append(Turn("assistant", turn_text(rng, words, args.turn_words)))
            turn += 1
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous
    return rows


def run(args, argv: list[str]) -> int:
    from convret.ops.session_attention.cpu import native_available

    if not native_available():
        print("convret bench cached-prefill: the native CPU extension is not built (convret.backend_info() says "
              "why)")
        return 2
    problem = _bad_arguments(args)
    if problem:
        print(f"convret bench cached-prefill: {problem}", file=sys.stderr)
        return 2
    lengths = sorted(int(x) for x in args.encoder_lengths.split(",") if x.strip())
    if args.smoke:
        args.conversations, args.cached, args.new, args.heads, args.dtypes = 2, 40, 9, "4/2/32", "fp32"
        args.reps, args.warmup, lengths, args.turn_words = 2, 1, [128], 20
    elif args.quick:
        args.heads, args.reps, lengths = "4/2/32", 3, [1024]
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "conversations": args.conversations,
                               "cached": args.cached, "new": args.new, "reps": args.reps, "warmup": args.warmup,
                               "encoder_conversations": args.encoder_conversations}
    payload["attention"] = attention(args)
    payload["end_to_end"] = end_to_end(args, lengths) if lengths else []
    payload["load_average_after"] = list(os.getloadavg())
    diff = max((r["max_abs_diff"] for r in payload["end_to_end"]), default=0.0)
    payload["passed"] = diff <= TOLERANCE
    payload["plots"] = []
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def _bad_arguments(args) -> str | None:
    """What is wrong with the options, or None."""
    for heads in args.heads.split(","):
        parts = heads.split("/")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) % int(parts[1]):
            return f"--heads {heads!r}: want Hq/Hkv/D, positive integers with Hq a multiple of Hkv (e.g. 16/4/128)"
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        return f"--dtypes: unknown {unknown[0]!r}, choose from {sorted(DTYPES)}"
    if not all(x.strip().isdigit() for x in args.encoder_lengths.split(",") if x.strip()):
        return f"--encoder-lengths {args.encoder_lengths!r}: want comma-separated token counts (or '')"
    if min(args.conversations, args.new, args.encoder_conversations) < 1 or args.cached < 0:
        return "--conversations, --new and --encoder-conversations must be positive, --cached >= 0"
    return None


def format_report(payload: dict) -> str:
    lines = [*H.report_header(payload),
             f"Attention alone: one packed row of {payload['conversations']} conversations x ({payload['cached']} "
             f"cached + {payload['new']} new tokens); medians of {payload['reps']} alternating rounds after "
             f"{payload['warmup']} warm-up calls (wall time; CPU time of the process):", ""]
    rows = [[r["heads"], r["dtype"], H.fmt_ms(r["cpu_ms"]), H.fmt_ms(r["sdpa_ms"]), f"x{r['speedup']:.2f}",
             f"x{r['cpu_time_speedup']:.2f}", f"{r['max_abs_diff']:.1e}"] for r in payload["attention"]]
    lines.append(H.markdown_table(["Hq/Hkv/D", "dtype", "native cpu", "sdpa loop", "speedup", "speedup (CPU time)",
                                   "max |cpu - sdpa|"], rows))
    if payload["end_to_end"]:
        lines += ["", f"End to end: SessionEncoder on the tiny Qwen2 (fp32), {payload['encoder_conversations']} "
                      f"conversation(s) per batch, one encode per turn, medians of {payload['reps']} turns past "
                      "each length:", ""]
        rows = [[f"{r['target']:,}", f"{r['mean_tokens']:.0f}", f"{r['mean_computed']:.0f}", H.fmt_ms(r["cpu_ms"]),
                 H.fmt_ms(r["sdpa_ms"]), f"x{r['speedup']:.2f}", f"{r['max_abs_diff']:.1e}"]
                for r in payload["end_to_end"]]
        lines.append(H.markdown_table(["length", "session tokens", "tokens run", "native cpu", "sdpa loop",
                                       "speedup", "max |diff|"], rows))
    return "\n".join(lines)
