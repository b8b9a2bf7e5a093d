"""InfoNCE on CPU tensors (``backend="cpu"``): :class:`ChunkedInfoNCE`, query chunks against all passages.

Holding one chunk's full row of scores gives its softmax exactly, so the forward pass also produces dQ, dP and
d(temperature) with the same three GEMMs the naive version runs; the backward only scales them. Memory: O(Q + P)
plus one ``[chunk_rows, P]`` block of scores (``CPU_CHUNK_BYTES``).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .reference import false_negative_mask

# Bytes of fp32 scores one CPU chunk may hold; the chunk is this many bytes / (4 * P) query rows.
CPU_CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 64  # GEMMs with fewer rows spend more on the read-modify-write of dP than on arithmetic


def chunked_info_nce(queries, passages, temperature, labels, passage_ids, reduction):
    """The registered ``backend="cpu"`` entry: chunk rows from the current ``CPU_CHUNK_BYTES``."""
    return ChunkedInfoNCE.apply(queries, passages, temperature, labels, passage_ids, reduction,
                                _cpu_chunk_rows(passages.shape[0]))


def _cpu_chunk_rows(num_passages: int) -> int:
    return max(MIN_CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * num_passages))


def _row_weights(grad_output: torch.Tensor, reduction: str, num_queries: int) -> torch.Tensor:
    """d(result)/d(loss_i) times the incoming gradient, as a ``[Q]`` fp32 vector."""
    grad_output = grad_output.float()
    if reduction == "none":
        return grad_output
    if reduction == "mean":
        grad_output = grad_output / num_queries
    return grad_output.expand(num_queries)


class ChunkedInfoNCE(torch.autograd.Function):
    """CPU InfoNCE in query chunks: O(Q + P) memory plus one ``[chunk_rows, P]`` block of scores.

    For "mean" / "sum" the forward pass also computes the gradients for a unit incoming gradient (the
    chunk's scores turn into ``exp(s - max)`` in place, then ``dQ = G P / tau``, ``dP += G^T Q / tau`` with
    ``G = softmax - onehot``); the backward scales them. "none" (per-row incoming gradients) and a second
    backward through the same graph recompute the scores chunk by chunk instead.
    """

    @staticmethod
    def forward(ctx, queries, passages, temperature, labels, passage_ids, reduction, chunk_rows):
        need_dq, need_dp, need_dtau = ctx.needs_input_grad[:3]
        compute_dtype = torch.promote_types(queries.dtype, torch.float32)
        q = queries.to(compute_dtype).contiguous()
        p = passages.to(compute_dtype)
        inv_tau = 1.0 / temperature.item()
        num_queries = q.shape[0]
        fuse = reduction != "none" and (need_dq or need_dp or need_dtau)
        weight = 1.0 / num_queries if reduction == "mean" else 1.0

        lse = torch.empty(num_queries, dtype=compute_dtype)
        pos_scores = torch.empty(num_queries, dtype=compute_dtype)
        grads = _ChunkGrads(q, p, labels, need_dq, need_dp, need_dtau) if fuse else None
        scores_buffer = torch.empty(min(chunk_rows, num_queries) * p.shape[0], dtype=compute_dtype)
        for start in range(0, num_queries, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_queries))
            scores = _chunk_scores(q[rows], p, inv_tau, labels[rows], passage_ids, scores_buffer)
            pos_scores[rows] = scores[torch.arange(scores.shape[0]), labels[rows]]
            row_max = scores.amax(dim=1, keepdim=True)
            scores.sub_(row_max).exp_()
            row_sum = scores.sum(dim=1, keepdim=True)
            lse[rows] = (row_max + row_sum.log()).squeeze(1)
            if fuse:  # dloss_i/ds_ij = exp_ij / row_sum_i - [j == label_i]
                grads.add_chunk(rows, scores, 1.0 / row_sum.squeeze(1))
        del scores_buffer, scores
        losses = lse - pos_scores

        ctx.save_for_backward(queries, passages, temperature, labels, passage_ids, lse)
        ctx.reduction, ctx.chunk_rows = reduction, chunk_rows
        ctx.fused = grads.finish(inv_tau, weight) if fuse else None
        if reduction == "mean":
            return losses.mean()
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        queries, passages, temperature, labels, passage_ids, lse = ctx.saved_tensors
        need_dq, need_dp, need_dtau = ctx.needs_input_grad[:3]
        if ctx.fused is not None:
            dq, dp, dtau = ctx.fused
            ctx.fused = None  # hand the buffers over (autograd can then keep them as .grad without a copy)
            scale = grad_output.item()
            if scale != 1.0:
                dq, dp, dtau = (None if g is None else g.mul_(scale) for g in (dq, dp, dtau))
        else:
            dq, dp, dtau = _recompute_grads(queries, passages, temperature, labels, passage_ids, lse,
                                            _row_weights(grad_output, ctx.reduction, queries.shape[0]),
                                            ctx.chunk_rows, need_dq, need_dp, need_dtau)
        dq = dq.to(queries.dtype) if need_dq and dq is not None else None
        dp = dp.to(passages.dtype) if need_dp and dp is not None else None
        dtau = dtau.to(temperature.dtype).reshape(temperature.shape) if need_dtau else None
        return dq, dp, dtau, None, None, None, None


def _chunk_scores(q_chunk, p, inv_tau, chunk_labels, passage_ids, buffer):
    """``[rows, P]`` scores of one query chunk, written into the flat ``buffer`` as a ``[P, rows]`` matrix and
    returned as its transposed view. ``p @ q_chunk.T`` makes MKL pack only the small operand; the row-major
    ``q_chunk @ p.T`` packs ``p`` into a scratch buffer as large as the chunk itself (32 MiB here)."""
    rows = q_chunk.shape[0]
    scores_t = buffer[: p.shape[0] * rows].view(p.shape[0], rows)
    torch.addmm(scores_t, p, q_chunk.T, beta=0.0, alpha=inv_tau, out=scores_t)
    scores = scores_t.T
    if passage_ids is not None:
        scores.masked_fill_(false_negative_mask(chunk_labels, passage_ids), float("-inf"))
    return scores


class _ChunkGrads:
    """Accumulates dQ, dP and d(temperature) one query chunk at a time from
    ``G_ij = prob_scale_i * exp_scores_ij - target_weight_i * [j == label_i]``.

    Only the two GEMMs touch the ``[rows, P]`` block: the per-row scales go into the small operands and the
    one-hot part into a row gather / ``index_add_``. On a machine whose cores are shared, every extra
    multi-threaded op costs a thread wake-up, so the per-row work on dQ is done once for all rows at the end.
    """

    def __init__(self, q, p, labels, need_dq, need_dp, need_dtau):
        self.q, self.p, self.labels = q, p, labels
        self.need_dq, self.need_dp, self.need_dtau = need_dq, need_dp, need_dtau
        self.dq = torch.empty_like(q) if (need_dq or need_dtau) else None
        self.dp = torch.zeros_like(p) if need_dp else None
        self.prob_scale = torch.empty(q.shape[0], dtype=q.dtype)
        self.target_weight = None

    def add_chunk(self, rows, exp_scores, prob_scale, target_weight=None):
        """``target_weight=None``: all ones."""
        q_chunk = self.q[rows]
        if self.dq is not None:
            torch.mm(exp_scores, self.p, out=self.dq[rows])  # rows scaled and one-hot part removed in finish()
            self.prob_scale[rows] = prob_scale
        if self.dp is not None:
            self.dp.addmm_(exp_scores.T, q_chunk * prob_scale.unsqueeze(1))
            targets = q_chunk if target_weight is None else q_chunk * target_weight.unsqueeze(1)
            self.dp.index_add_(0, self.labels[rows], targets, alpha=-1.0)

    def finish(self, inv_tau, weight, target_weight=None):
        """Apply the per-row scales, the one-hot part, 1/tau and the reduction's weight; return (dq, dp, dtau)."""
        scale = inv_tau * weight
        dq = dtau = None
        if self.dq is not None:
            self.dq.mul_(self.prob_scale.unsqueeze(1))
            targets = self.p.index_select(0, self.labels)  # [Q, D]: no larger than the freed scores block
            if target_weight is not None:
                targets.mul_(target_weight.unsqueeze(1))
            self.dq.sub_(targets)
            del targets
            if self.need_dtau:
                # sum_ij g_ij s_ij = sum_i q_i . (sum_j g_ij p_j) / tau: no pass over the scores (which hold -inf);
                # s = q.p / tau gives ds/dtau = -s / tau
                dtau = torch.dot(self.q.view(-1), self.dq.view(-1)) * (-inv_tau * inv_tau * weight)
            dq = self.dq.mul_(scale) if self.need_dq else None
        dp = self.dp.mul_(scale) if self.need_dp else None
        return dq, dp, dtau


def _recompute_grads(queries, passages, temperature, labels, passage_ids, lse, row_weights, chunk_rows,
                     need_dq, need_dp, need_dtau):
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)
    q = queries.to(compute_dtype).contiguous()
    p = passages.to(compute_dtype)
    inv_tau = 1.0 / temperature.item()
    row_weights = row_weights.to(compute_dtype)
    grads = _ChunkGrads(q, p, labels, need_dq, need_dp, need_dtau)
    scores_buffer = torch.empty(min(chunk_rows, q.shape[0]) * p.shape[0], dtype=compute_dtype)
    for start in range(0, q.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, q.shape[0]))
        probs = _chunk_scores(q[rows], p, inv_tau, labels[rows], passage_ids, scores_buffer)
        probs.sub_(lse[rows].unsqueeze(1)).exp_()
        grads.add_chunk(rows, probs, row_weights[rows], row_weights[rows])
    del scores_buffer, probs
    return grads.finish(inv_tau, 1.0, row_weights)
