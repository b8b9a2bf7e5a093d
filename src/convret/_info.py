"""``convret.backend_info()``: which implementation each op runs, read from the backend registry."""
from __future__ import annotations

from typing import Any

import torch

from . import _dispatch
from .ops.session_attention.cached import cached_prefill_info
from .ops.session_attention.cpu import backend_info as _cpu_session_attention_info


def backend_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Which path each op takes on ``device``, and why.

    Returns the CPU session-attention details at the top level (``implementation``: ``"native"`` or
    ``"fallback"``, ``reason``, ``library``, ``blas``, ``threads``, ``tile_sizes``, ``cached_prefill``: which path serves the cached prefill of
    the incremental session encoder on CPU) and, under ``"ops"``, per op
    (``session_attention``, ``info_nce``, ``linear_cross_entropy``): the backend ``"auto"`` picks on
    ``device`` (after the ``CONVRET_BACKEND_<OP>`` environment override), that variable's name, and for
    every registered backend its rank and whether it can run on ``device`` (else the reason).
    """
    info = dict(_cpu_session_attention_info())
    info["cached_prefill"] = cached_prefill_info()  # which path serves the incremental encoder's prefill on CPU
    info["ops"] = _dispatch.describe(device)
    return info
