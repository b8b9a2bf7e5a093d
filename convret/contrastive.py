"""InfoNCE over in-batch and hard negatives without the ``[Q, P]`` score matrix.

``info_nce`` is the public function; backends:

- ``"triton"``: fused kernels (``convret.kernels.info_nce``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``.
- ``"cpu"``: :class:`ChunkedInfoNCE`, query chunks against all passages. Holding one chunk's full row of
  scores gives its softmax exactly, so the forward pass also produces dQ, dP and d(temperature) with the same
  three GEMMs the naive version runs; the backward only scales them.
- ``"reference"``: ``F.cross_entropy`` on the full logits, the oracle (O(Q * P) memory).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import triton_usable

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "reference")

# Bytes of fp32 scores one CPU chunk may hold; the chunk is this many bytes / (4 * P) query rows.
CPU_CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 64  # GEMMs with fewer rows spend more on the read-modify-write of dP than on arithmetic


def info_nce(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float | torch.Tensor = 0.01,
    group_size: int | None = None,
    labels: torch.Tensor | None = None,
    passage_ids: torch.Tensor | None = None,
    gather: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE of each query against its positive, its hard negatives and every other passage in the batch.

    ``loss_i = logsumexp_j(s_ij) - s_i,pos_i`` with ``s_ij = queries[i] . passages[j] / temperature``.

    Args:
        queries: ``[Q, D]``, fp32, fp16 or bf16 (accumulation is always fp32).
        passages: ``[P, D]``, same dtype and device as ``queries``.
        temperature: a positive float, or a 0-d tensor (it receives a gradient: learnable temperature).
        group_size: Tevatron / GRIT layout (the default): ``P = Q * group_size``; passage ``i * group_size`` is
            query i's positive, the next ``group_size - 1`` its hard negatives. When neither ``group_size`` nor
            ``labels`` is given, ``group_size = P // Q``.
        labels: ``[Q]`` integer index of each query's positive in ``passages`` (sentence-transformers column
            layout, e.g. ``[P_1..P_B, N1_1..N1_B, ...]`` with ``labels = arange(B)``). Exclusive with
            ``group_size``.
        passage_ids: ``[P]`` integer ids; a passage whose id equals the id of query i's positive (other than
            the positive itself) is a false negative and left out of query i's denominator.
        gather: under ``torch.distributed``, score the local queries against the passages of every rank.
            Gradients flow back to the rank that owns each passage. Every rank must pass the same Q and P.
            Convention: with ``reduction="mean"`` the result is the mean over this rank's queries, with
            ``"sum"`` it is ``world_size`` times the sum over this rank's queries. Either way the average of
            the result over ranks is the single-process loss on the concatenated global batch, and after DDP's
            gradient averaging the parameter gradients equal single-process training on that batch.
            ``"none"`` returns this rank's per-query losses, unscaled.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[Q]`` per-query losses).
        backend: ``"triton"``, ``"cpu"``, ``"reference"`` or ``"auto"`` (triton on CUDA, cpu on CPU).

    Returns:
        fp32 (float64 for float64 inputs) loss: a scalar, or ``[Q]`` for ``reduction="none"``.
    """
    labels = _check_and_make_labels(queries, passages, temperature, group_size, labels, passage_ids, reduction)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    name = _resolve_backend(backend, queries.device)
    world_size = 1
    if gather:
        passages, labels, passage_ids, world_size = gather_passages(queries, passages, labels, passage_ids)

    if isinstance(temperature, torch.Tensor):
        temperature = temperature.reshape(())
    else:
        temperature = torch.tensor(float(temperature), dtype=torch.float32, device=queries.device)

    if name == "reference":
        loss = reference_info_nce(queries, passages, temperature, labels, passage_ids, reduction)
    elif name == "cpu":
        loss = ChunkedInfoNCE.apply(queries, passages, temperature, labels, passage_ids, reduction,
                                    _cpu_chunk_rows(passages.shape[0]))
    else:
        from .kernels.info_nce import info_nce_triton

        loss = info_nce_triton(queries, passages, temperature, labels, passage_ids, reduction)
    if reduction == "sum" and world_size > 1:
        loss = loss * world_size
    return loss


class InfoNCELoss(nn.Module):
    """Contrastive loss of a dense retriever: each query against its positive, its hard negatives and every
    other passage of the (optionally global, multi-GPU) batch, computed without the ``[Q, P]`` score matrix.

    ``loss = mean_i [ logsumexp_j (q_i . p_j / tau) - q_i . p_pos(i) / tau ]`` (InfoNCE, van den Oord et al.
    2018, "Representation Learning with Contrastive Predictive Coding"; used with tau = 0.01 and 4 hard
    negatives by ChatRetriever's CSIT, Mao et al., ACL 2024 Findings).

    Shapes:
        queries ``[Q, D]``; passages ``[Q * group_size, D]`` grouped per query as ``[pos, neg_1 .. neg_k]``
        (Tevatron layout), or any ``[P, D]`` with ``labels [Q]``; optional ``passage_ids [P]`` mask duplicates
        of the positive. Output: a scalar (``[Q]`` with ``reduction="none"``).

    Args:
        temperature: initial tau.
        learnable_temperature: make tau a parameter, stored as ``log(tau)`` so it stays positive.
        group_size, gather, reduction, backend: as in :func:`info_nce`.

    Example::

        >>> loss_fn = InfoNCELoss(temperature=0.01, group_size=5)
        >>> q = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
        >>> p = torch.nn.functional.normalize(torch.randn(40, 64), dim=-1)
        >>> loss = loss_fn(q, p)
    """

    def __init__(
        self,
        temperature: float = 0.01,
        learnable_temperature: bool = False,
        group_size: int | None = None,
        gather: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.group_size = group_size
        self.gather = gather
        self.reduction = reduction
        self.backend = backend
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_buffer("log_temperature", torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(
        self,
        queries: torch.Tensor,
        passages: torch.Tensor,
        labels: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(queries, passages, self.temperature, group_size=None if labels is not None else self.group_size,
                        labels=labels, passage_ids=passage_ids, gather=self.gather, reduction=self.reduction,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature.item():.4g}, group_size={self.group_size}, gather={self.gather}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


# ------------------------------------------------------------------------------------------ validation
def _check_and_make_labels(queries, passages, temperature, group_size, labels, passage_ids, reduction):
    """Validate everything and return the ``[Q]`` int64 positive index of each (local) query."""
    for name, t in (("queries", queries), ("passages", passages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, D], got shape {tuple(getattr(t, 'shape', ()))}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    num_queries, dim = queries.shape
    num_passages = passages.shape[0]
    if passages.shape[1] != dim:
        raise ValueError(f"queries and passages differ in embedding size: queries {tuple(queries.shape)}, "
                         f"passages {tuple(passages.shape)}")
    if num_queries == 0 or num_passages == 0 or dim == 0:
        raise ValueError(f"empty input: queries {tuple(queries.shape)}, passages {tuple(passages.shape)}")
    if queries.dtype != passages.dtype:
        raise ValueError(f"queries and passages have different dtypes: {queries.dtype} and {passages.dtype}")
    if queries.device != passages.device:
        raise ValueError(f"queries and passages on different devices: {queries.device} and {passages.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature tensor must be a floating-point scalar, got shape "
                             f"{tuple(temperature.shape)} and dtype {temperature.dtype}")
        if temperature.device != queries.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature on {temperature.device}, queries on {queries.device}")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")

    if labels is not None and group_size is not None:
        raise ValueError("pass either group_size (grouped layout) or labels (explicit positives), not both")
    if labels is None:
        if group_size is None:
            if num_passages % num_queries != 0:
                raise ValueError(f"default grouped layout needs P to be a multiple of Q, got Q={num_queries}, "
                                 f"P={num_passages}; pass labels for another layout")
            group_size = num_passages // num_queries
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if num_passages % group_size != 0:
            raise ValueError(f"P={num_passages} is not divisible by group_size={group_size}")
        if num_passages != num_queries * group_size:
            raise ValueError(f"grouped layout needs P == Q * group_size, got P={num_passages}, Q={num_queries}, "
                             f"group_size={group_size}")
        labels = torch.arange(num_queries, device=queries.device) * group_size
    else:
        if not isinstance(labels, torch.Tensor) or labels.shape != (num_queries,):
            raise ValueError(f"labels must be a [Q] = [{num_queries}] tensor, got shape "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels must be integer indices, got {labels.dtype}")
        labels = labels.to(device=queries.device, dtype=torch.int64)

    if passage_ids is not None:
        if not isinstance(passage_ids, torch.Tensor) or passage_ids.shape != (num_passages,):
            raise ValueError(f"passage_ids must be a [P] = [{num_passages}] tensor, got shape "
                             f"{tuple(getattr(passage_ids, 'shape', ()))}")
        if passage_ids.dtype.is_floating_point or passage_ids.is_complex():
            raise ValueError(f"passage_ids must be integers, got {passage_ids.dtype}")
        if passage_ids.device != queries.device:
            raise ValueError(f"passage_ids on {passage_ids.device}, queries on {queries.device}")

    # One host sync for every value check.
    # A NaN or inf anywhere makes the sum non-finite; the sum allocates nothing the size of the input. Only
    # a non-finite sum (a bad value or an overflow of the sum itself) pays for the exact check.
    checks = [
        (labels.min() < 0) | (labels.max() >= num_passages),
        ~torch.isfinite(queries.detach().sum()),
        ~torch.isfinite(passages.detach().sum()),
    ]
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(queries.device)
        checks.append(~torch.isfinite(t).all() | (t <= 0).any())
    labels_bad, queries_bad, passages_bad, *tau_bad = torch.stack([c.reshape(()) for c in checks]).tolist()
    if labels_bad:
        raise ValueError(f"labels out of range [0, P={num_passages}): min {labels.min().item()}, "
                         f"max {labels.max().item()}")
    for name, t, suspect in (("queries", queries, queries_bad), ("passages", passages, passages_bad)):
        if suspect and not torch.isfinite(t.detach()).all():
            raise ValueError(f"{name} contain NaN or inf")
    if (tau_bad and tau_bad[0]) or (not isinstance(temperature, torch.Tensor)
                                   and not (math.isfinite(temperature) and temperature > 0)):
        value = temperature.item() if isinstance(temperature, torch.Tensor) else temperature
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return labels


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got device {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
    return backend


def false_negative_mask(labels: torch.Tensor, passage_ids: torch.Tensor) -> torch.Tensor:
    """``[len(labels), P]`` bool: passages sharing the id of the row's positive, the positive itself excluded."""
    same = passage_ids[labels].unsqueeze(1) == passage_ids.unsqueeze(0)
    same[torch.arange(labels.shape[0], device=labels.device), labels] = False
    return same


# ------------------------------------------------------------------------------------------ multi-process
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
    def backward(ctx, grad):
        rank = dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[: ctx.rows])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank * ctx.rows: (rank + 1) * ctx.rows]


# ------------------------------------------------------------------------------------------ reference
def reference_info_nce(queries, passages, temperature, labels, passage_ids, reduction):
    """The naive formula, differentiable by plain autograd, in at least fp32: the oracle."""
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)
    logits = queries.to(compute_dtype) @ passages.to(compute_dtype).T / temperature.to(compute_dtype)
    if passage_ids is not None:
        logits = logits.masked_fill(false_negative_mask(labels, passage_ids), float("-inf"))
    return F.cross_entropy(logits, labels, reduction=reduction)


# ------------------------------------------------------------------------------------------ CPU backend
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
