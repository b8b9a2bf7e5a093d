"""InfoNCE across processes: all-gather the passages of every rank, with the gradient routed back to the rank
that owns each passage (``info_nce(..., gather=True)``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


def gather_passages(queries, passages, labels, passage_ids):
    """All-gather passages (with gradient) and ids from every rank; remap labels to global indices.

    Rank r's passages land at ``[r * P, (r + 1) * P)`` of the global set, so its labels shift by ``r * P``
    (grouped layout: query i of rank r has its positive at ``(r * Q + i) * group_size``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.tensor([queries.shape[0], passages.shape[0], int(passage_ids is not None)],
                         device=passages.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    if any(not torch.equal(s, sizes) for s in all_sizes):
        raise ValueError(f"gather=True needs the same Q and P (and passage_ids on all or none) on every rank, "
                         f"got [Q, P, has_ids] per rank: {[s.tolist() for s in all_sizes]}")
    global_passages = _GatherWithGradient.apply(passages)
    global_ids = None
    if passage_ids is not None:
        id_list = [torch.empty_like(passage_ids) for _ in range(world_size)]
        dist.all_gather(id_list, passage_ids.contiguous())
        global_ids = torch.cat(id_list)
    return global_passages, labels + rank * passages.shape[0], global_ids, world_size


class _GatherWithGradient(torch.autograd.Function):
    """``[P, D]`` per rank -> ``[world_size * P, D]`` on every rank. Backward: each rank receives the sum over
    ranks of the gradients of its rows (every rank's loss used them)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rank = dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[: ctx.rows])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank * ctx.rows: (rank + 1) * ctx.rows]
