"""Fraction of (query tile, key tile) pairs that each Triton kernel skips, is full or partial for a CSIT layout.

    python bench/tile_stats.py [--session 1024] [--response 384] [--summary 3]

``convret bench gpu-report`` runs :func:`tile_fractions` over a sweep of typical CSIT layouts.
"""
from __future__ import annotations

import argparse

import torch

from convret import SessionLayout
from convret.kernels.session_attention import default_configs


def tile_fractions(layout: SessionLayout, block_m: int, block_n: int) -> dict[str, int | float]:
    """Counts of skipped (never loaded), full (no mask arithmetic) and partial tiles over every row of the
    layout, and how many of the skipped ones a causal-only kernel would have computed."""
    classes = layout.tile_classes(block_m, block_n)
    q_first = torch.arange(classes.shape[1]).view(-1, 1) * block_m
    k_first = torch.arange(classes.shape[2]).view(1, -1) * block_n
    causal = (k_first <= q_first + block_m - 1).expand_as(classes[0])
    total = classes.numel()
    skipped = int((classes == 0).sum())
    causal_tiles = int(causal.sum()) * classes.shape[0]
    beyond = int(((classes == 0) & causal).sum())
    return {"tiles": total, "skipped": skipped, "full": int((classes == 1).sum()), "partial": int((classes == 2).sum()),
            "skipped_fraction": skipped / total, "causal_tiles": causal_tiles, "skipped_beyond_causal": beyond,
            "skipped_beyond_causal_fraction": beyond / max(causal_tiles, 1)}


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
        s = tile_fractions(layout, block_m, block_n)
        print(f"| {name} | {block_m} x {block_n} | {s['tiles']} | {s['skipped']} ({s['skipped_fraction']:.0%}) | "
              f"{s['full']} | {s['partial']} | {s['skipped_beyond_causal']} of {s['causal_tiles']} causal tiles "
              f"({s['skipped_beyond_causal_fraction']:.0%}) |")


if __name__ == "__main__":
    main()
