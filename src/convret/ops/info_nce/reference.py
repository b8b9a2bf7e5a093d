"""InfoNCE oracle (``backend="reference"``): ``F.cross_entropy`` on the full ``[Q, P]`` logits, and the
false-negative mask every backend shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(labels: torch.Tensor, passage_ids: torch.Tensor) -> torch.Tensor:
    """``[len(labels), P]`` bool: passages sharing the id of the row's positive, the positive itself excluded."""
    same = passage_ids[labels].unsqueeze(1) == passage_ids.unsqueeze(0)
    same[torch.arange(labels.shape[0], device=labels.device), labels] = False
    return same


def reference_info_nce(queries, passages, temperature, labels, passage_ids, reduction):
    """The naive formula, differentiable by plain autograd, in at least fp32: the oracle."""
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)
    logits = queries.to(compute_dtype) @ passages.to(compute_dtype).T / temperature.to(compute_dtype)
    if passage_ids is not None:
        logits = logits.masked_fill(false_negative_mask(labels, passage_ids), float("-inf"))
    return F.cross_entropy(logits, labels, reduction=reduction)
