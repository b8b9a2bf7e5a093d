"""Triton session attention against its GPU peers, forward and forward + backward (needs a CUDA GPU).

    python bench/bench_attention_gpu.py [--dtype bfloat16] [--repeats 20]

Shape: B = 2, Hq = 16, Hkv = 4, D = 128, one CSIT sample per row (session 1024, t = 3, response 384 + 3), and
a packed row of 4096 tokens (one CSIT sample and six passages of 384 + 3). Peers (DESIGN.md section 3):
dense-mask eager, SDPA with a dense bool mask, compiled FlexAttention with an equivalent BlockMask, and the
flash-attn varlen decomposition when flash-attn is installed. Medians of CUDA-event timings after warm-up;
peak memory from torch.cuda.max_memory_allocated above the inputs.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from convret import SessionLayout, session_attention
from convret.baselines import additive_mask, dense_mask_eager_attention, sdpa_dense_mask_attention


def csit_layouts(batch: int) -> dict[str, SessionLayout]:
    t = 3
    csit = (1024, t, 384 + t)
    passage = (384, t, 0)
    return {
        "CSIT 1024/384": SessionLayout.from_segments([[csit]] * batch, sum(csit), device="cuda"),
        "packed 4096": SessionLayout.from_segments([[csit] + [passage] * 6] * batch, 4096, device="cuda"),
    }


def peers(layout: SessionLayout, dtype: torch.dtype) -> dict:
    methods = {"convret triton": lambda q, k, v: session_attention(q, k, v, layout, backend="triton")}
    mask = additive_mask(layout, dtype)
    methods["dense-mask eager"] = lambda q, k, v: dense_mask_eager_attention(q, k, v, mask)
    bool_mask = layout.dense_mask().unsqueeze(1)
    methods["SDPA + dense bool mask"] = lambda q, k, v: sdpa_dense_mask_attention(q, k, v, bool_mask)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask_start = layout.mask_start

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < mask_start[b, kv_idx])

        block_mask = create_block_mask(mask_mod, layout.batch_size, None, layout.seq_len, layout.seq_len,
                                       device="cuda", _compile=True)
        compiled = torch.compile(flex_attention)
        methods["FlexAttention (compiled)"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask,
                                                                       enable_gqa=True)
    except ImportError:
        pass
    return methods


def timed(fn, q, k, v, backward: bool, warmup: int, repeats: int) -> float:
    grad = torch.randn_like(q)
    times = []
    for step in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v)
        if backward:
            out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end))
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_gpu.py needs a CUDA GPU; on CPU see bench/bench_attention_cpu.py")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, B={args.batch}, Hq=16, Hkv=4, D=128")
    print("| layout | method | fwd (ms) | fwd+bwd (ms) | peak memory fwd+bwd (MB) |")
    print("|---|---|---|---|---|")
    for layout_name, layout in csit_layouts(args.batch).items():
        shape = (args.batch, 16, layout.seq_len, 128)
        q = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(args.batch, 4, layout.seq_len, 128, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        for name, fn in peers(layout, dtype).items():
            forward = timed(fn, q, k, v, False, args.warmup, args.repeats)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            both = timed(fn, q, k, v, True, args.warmup, args.repeats)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"| {layout_name} | {name} | {forward:.3f} | {both:.3f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
