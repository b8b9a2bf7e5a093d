"""Fraction of (query tile, key tile) pairs that each Triton kernel skips, is full or partial for a CSIT layout.

    python bench/tile_stats.py [--session 1024] [--response 384] [--summary 3]
"""
import argparse

import torch

from convret import SessionLayout
from convret.kernels.session_attention import default_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--session", type=int, default=1024)
    parser.add_argument("--response", type=int, default=384)
    parser.add_argument("--summary", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    t = args.summary
    seq_len = args.session + 2 * t + args.response
    layout = SessionLayout.from_segments([[(args.session, t, args.response + t)]], seq_len)
    visible = layout.dense_mask()[0]
    print(f"CSIT row: session {args.session}, t = {t}, response {args.response} + {t}: L = {seq_len}; "
          f"{1 - visible.float().mean().item():.1%} of the L^2 pairs are masked")
    print("| kernel | tile (BLOCK_M x BLOCK_N) | tiles | skipped | full | partial | skipped beyond causality |")
    print("|---|---|---|---|---|---|---|")
    for name, (block_m, block_n, _, _) in default_configs(args.head_dim, getattr(torch, args.dtype)).items():
        classes = layout.tile_classes(block_m, block_n)[0]
        q_first = torch.arange(classes.shape[0]).view(-1, 1) * block_m
        k_first = torch.arange(classes.shape[1]).view(1, -1) * block_n
        causal = k_first <= q_first + block_m - 1
        total = classes.numel()
        skipped = int((classes == 0).sum())
        full = int((classes == 1).sum())
        partial = int((classes == 2).sum())
        beyond_causal = int(((classes == 0) & causal).sum())
        print(f"| {name} | {block_m} x {block_n} | {total} | {skipped} ({skipped / total:.0%}) | {full} | "
              f"{partial} | {beyond_causal} of {int(causal.sum())} causal tiles ({beyond_causal / int(causal.sum()):.0%}) |")


if __name__ == "__main__":
    main()
