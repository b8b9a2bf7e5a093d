"""``convret demo``: session attention on a CSIT batch beside the dense-mask baselines."""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

import torch

from . import SessionLayout, session_attention
from ._args import parse
from .ops.session_attention import resolve_backend
from .baselines import additive_mask, dense_mask_eager_attention, sdpa_dense_mask_attention
from .bench.harness import peak_rss_bytes as _peak_rss_bytes, reset_peak_rss as _reset_peak_rss


def _demo_inputs(args, device):
    t = args.summary_tokens
    # one CSIT LM sample per row: session, t summary tokens, response + its own t summary tokens
    segments = [[(args.session_len, t, args.response_len + t)]] * args.batch
    seq_len = args.session_len + 2 * t + args.response_len
    layout = SessionLayout.from_segments(segments, seq_len, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def draw(heads):
        x = torch.randn(args.batch, heads, seq_len, args.head_dim, generator=generator)
        return x.to(device=device, dtype=getattr(torch, args.dtype)).requires_grad_()

    return layout, draw(args.q_heads), draw(args.kv_heads), draw(args.kv_heads)


def _method(name, layout, dtype):
    if name == "convret":
        return lambda q, k, v: session_attention(q, k, v, layout)
    if name == "dense-mask eager":
        mask = additive_mask(layout, dtype)
        return lambda q, k, v: dense_mask_eager_attention(q, k, v, mask)
    bool_mask = layout.dense_mask().unsqueeze(1)
    return lambda q, k, v: sdpa_dense_mask_attention(q, k, v, bool_mask)


def _measure(name, args, device, result_queue=None):
    """Median fwd+bwd time (ms) and peak memory above the inputs (MB) of one method."""
    layout, q, k, v = _demo_inputs(args, device)
    grad = torch.randn(q.shape, dtype=q.dtype, device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _peak_rss_bytes()
    fn = _method(name, layout, q.dtype)  # the dense baselines build their [B, 1, L, L] mask here: it counts
    times = []
    for step in range(args.warmup + args.repeats):
        start = time.perf_counter()
        out = fn(q, k, v)
        out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
        q.grad = k.grad = v.grad = None
        del out
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    result = (statistics.median(times), peak / 2**20)
    if result_queue is not None:
        result_queue.put(result)
    return result


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="convret demo", description=(
        "Session-masked attention on a CSIT batch (forward + backward) beside the dense-mask baselines."))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--session-len", type=int, default=1024)
    parser.add_argument("--response-len", type=int, default=384)
    parser.add_argument("--summary-tokens", type=int, default=3)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse(parser, argv)
    device = torch.device(args.device)

    backend = resolve_backend("auto", device)
    seq_len = args.session_len + 2 * args.summary_tokens + args.response_len
    print(f"CSIT batch: {args.batch} x [session {args.session_len} | {args.summary_tokens} summary | "
          f"response {args.response_len} + {args.summary_tokens}] = {seq_len} tokens per row, "
          f"Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype} on {device} "
          f"(convret backend: {backend})")
    layout, q, k, v = _demo_inputs(args, device)
    with torch.no_grad():
        reference = dense_mask_eager_attention(q.float(), k.float(), v.float(), additive_mask(layout, torch.float32))
        got = session_attention(q, k, v, layout).float()
    print(f"max |convret - dense eager| = {(got - reference).abs().max().item():.2e}")

    methods = ["convret", "dense-mask eager", "SDPA + dense bool mask"]
    results = {}
    context = multiprocessing.get_context("spawn")
    for name in methods:
        if device.type == "cuda":
            results[name] = _measure(name, args, device)
            continue
        # on CPU each method runs in a fresh process so that its peak RSS is its own
        queue = context.Queue()
        process = context.Process(target=_measure, args=(name, args, device, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"{name}: failed (exit code {process.exitcode})", file=sys.stderr)
            return 1
        results[name] = queue.get()

    print(f"\n| method | fwd+bwd median (ms) | peak memory above inputs (MB) |")
    print("|---|---|---|")
    for name in methods:
        ms, mb = results[name]
        print(f"| {name} | {ms:.1f} | {mb:.1f} |")
    base_ms, base_mb = results["dense-mask eager"]
    ms, mb = results["convret"]
    print(f"\nconvret vs dense-mask eager: {base_ms / ms:.2f}x faster, {base_mb / max(mb, 1e-9):.1f}x less memory")
    return 0


main = demo
