"""Fraction of (query tile, key tile) pairs that each Triton kernel skips, is full or partial for a CSIT layout.

A library module, no command of its own: ``convret bench gpu-report`` runs :func:`tile_fractions` over a sweep of
typical CSIT layouts (its "tile-skip fractions" table replaces the old ``python bench/tile_stats.py``).
"""
from __future__ import annotations

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

