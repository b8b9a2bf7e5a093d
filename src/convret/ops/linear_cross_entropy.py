"""Chunked linear cross-entropy: the LM loss without ``[tokens, vocab]`` logits.

``linear_cross_entropy(hidden, weight, labels, label_smoothing=eps)`` equals
``F.cross_entropy(hidden @ weight.T + bias, labels, label_smoothing=eps, ignore_index=-100)`` but

- only the rows with a label take part (the LM head never runs on embedding samples or prompt tokens);
- those rows are processed in chunks of ``chunk_size`` tokens: one ``[chunk, V]`` logits buffer at a time,
  turned in place into its gradient during the forward pass, so the backward pass is three small products;
- on CUDA the per-chunk softmax / loss / gradient is one Triton kernel (src/convret/kernels/linear_cross_entropy.py), on
  CPU a few fused PyTorch ops.

Gradients flow to ``hidden``, ``weight`` and ``bias`` (each only if it requires grad).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _dispatch

OP = "linear_cross_entropy"
IGNORE_INDEX = -100
# Elements of one logits chunk: 2**24 fp32 values = 64 MiB, about 110 tokens at the 151,936 vocabulary of Qwen.
DEFAULT_CHUNK_ELEMENTS = 2**24

__all__ = ["linear_cross_entropy", "LinearCrossEntropy"]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` hidden states (labels already aligned: row i predicts ``labels[i]``; shift
            yourself for next-token prediction).
        weight: ``[V, H]`` output embedding (``lm_head.weight``); bias: optional ``[V]``.
        labels: ``[...]`` int targets, ``ignore_index`` where there is no target.
        label_smoothing: epsilon of ``F.cross_entropy`` (ChatRetriever's released code uses 0.1).
        reduction: ``"mean"`` over the labelled tokens or ``"sum"``.
        chunk_size: tokens per logits chunk; default keeps a chunk near 2**24 elements.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (any device) or
            ``"auto"`` (``$CONVRET_BACKEND_LINEAR_CROSS_ENTROPY`` if set, else triton on CUDA, torch elsewhere).

    Returns:
        A scalar fp32 tensor. With no labelled token it is 0 (``F.cross_entropy`` would give NaN for
        ``"mean"``), so a batch without LM samples does not poison the total loss.

    Raises:
        ValueError: bad shapes or arguments, or a label outside ``[0, V)`` other than ``ignore_index`` (the
            Triton kernel would read logit 0 for it, ``F.cross_entropy`` raises too).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the token dims")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    labelled = labels != ignore_index
    out_of_range = labelled & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(out_of_range.any()):
        bad = labels[out_of_range]
        raise ValueError(f"labels must be in [0, V={weight.shape[0]}) or ignore_index={ignore_index}; got "
                         f"{bad.numel()} out of range (min {bad.min().item()}, max {bad.max().item()})")
    rows_loss = _dispatch.resolve(OP, backend, hidden.device).fn
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, float(label_smoothing), reduction, int(ignore_index), int(chunk_size), rows_loss
    )


class LinearCrossEntropy(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``loss = module(hidden, lm_head.weight, labels)``."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                 chunk_size: int | None = None, backend: str = "auto"):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, labels, bias, self.label_smoothing, self.reduction,
                                    self.ignore_index, self.chunk_size, self.backend)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


def _cross_entropy_rows_torch(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, grad_scale: float | None
) -> torch.Tensor:
    """CPU twin of the Triton kernel: per-row fp32 loss; with ``grad_scale``, logits become their gradient."""
    # Every full pass over the [chunk, V] buffer costs as much as a small GEMM: work in place, few passes.
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    vocab_size = z.shape[1]
    z_label = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    z_mean = z.mean(1) if label_smoothing else None
    row_max = z.amax(1, keepdim=True)
    exp = z.sub_(row_max).exp_()  # z is the chunk buffer (or its fp32 copy): overwritten from here on
    sum_exp = exp.sum(1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * z_label
    if label_smoothing:
        loss = loss - label_smoothing * z_mean
    if grad_scale is not None:
        grad = exp.mul_(grad_scale / sum_exp)  # softmax * scale
        if label_smoothing:
            grad.sub_(grad_scale * label_smoothing / vocab_size)
        grad.scatter_add_(1, labels.unsqueeze(1), torch.full_like(grad[:, :1], -grad_scale * (1.0 - label_smoothing)))
        if grad is not logits:
            logits.copy_(grad)
    return loss if loss.dtype == torch.float64 else loss.float()


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, label_smoothing, reduction, ignore_index, chunk_size, rows_loss):
        hidden_shape = hidden.shape
        flat_hidden = hidden.reshape(-1, hidden_shape[-1])
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != ignore_index).nonzero().squeeze(1)
        num_rows = rows.numel()

        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want_grad = need_hidden or need_weight or need_bias
        scale = 1.0 / num_rows if (reduction == "mean" and num_rows > 0) else 1.0

        grad_hidden_rows = torch.empty(num_rows, hidden_shape[-1], dtype=hidden.dtype, device=hidden.device) \
            if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) \
            if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32 if bias is None else
                                torch.promote_types(bias.dtype, torch.float32), device=weight.device) \
            if need_bias else None
        total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=hidden.device)
        for start in range(0, num_rows, chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            h = flat_hidden.index_select(0, chunk_rows)
            y = flat_labels.index_select(0, chunk_rows)
            logits = h @ weight.t()
            if bias is not None:
                logits += bias
            loss = rows_loss(logits, y, label_smoothing, scale if want_grad else None)
            total += loss.sum().to(total.dtype)
            if want_grad:
                grad_logits = logits  # overwritten in place by rows_loss
                if need_hidden:
                    grad_hidden_rows[start : start + chunk_rows.numel()] = grad_logits.to(weight.dtype) @ weight
                if need_weight:
                    grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
                if need_bias:
                    grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
        result = total * scale
        ctx.hidden_shape = hidden_shape
        ctx.save_for_backward(rows, grad_hidden_rows, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return result.to(torch.float32) if hidden.dtype != torch.float64 else result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rows, grad_hidden_rows, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            num_tokens = 1
            for d in ctx.hidden_shape[:-1]:
                num_tokens *= d
            grad_hidden = torch.zeros(num_tokens, ctx.hidden_shape[-1], dtype=hidden_dtype, device=rows.device)
            grad_hidden.index_copy_(0, rows, grad_hidden_rows * grad_output.to(hidden_dtype))
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_weight * grad_output).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (grad_bias * grad_output).to(bias_dtype)
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None


def _cross_entropy_rows_triton(logits, labels, label_smoothing, grad_scale):
    from ..kernels.linear_cross_entropy import cross_entropy_rows_triton

    return cross_entropy_rows_triton(logits, labels, label_smoothing, grad_scale)


# Bounds of tests/test_lm_loss.py against F.cross_entropy in float64: relative error of the loss (the
# gradients' relative norm error is held to 10x that).
_dispatch.register(OP, "triton", _cross_entropy_rows_triton, rank=30, gate=_dispatch.triton_gate,
                   auto_devices=("cuda",), tolerances={torch.float32: 1e-5, torch.float16: 2e-3},
                   description="chunked GEMMs + one Triton kernel per chunk (softmax, loss, gradient)")
_dispatch.register(OP, "torch", _cross_entropy_rows_torch, rank=10,
                   tolerances={torch.float64: 1e-12, torch.float32: 1e-5},
                   description="chunked GEMMs + fused PyTorch ops per chunk, any device")
