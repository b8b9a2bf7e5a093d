"""Triton session attention against its GPU peers: now ``convret bench attention`` on a CUDA device.

    python bench/bench_attention_gpu.py [options of convret bench attention]

is ``convret bench attention --device cuda [options]``: fp16, bf16 and fp32 (TF32), dense-mask eager, SDPA
with a dense bool mask, compiled FlexAttention (forward + backward), the flash-attn varlen decomposition when
flash-attn is installed (two varlen calls per batch, see convret.bench.peers), and convret's Triton kernels;
CUDA-event-free wall timing after torch.cuda.synchronize, peaks from max_memory_allocated.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["attention", "--device", "cuda", *sys.argv[1:]]))
