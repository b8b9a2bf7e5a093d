"""Triton kernel for the cross-entropy part of the chunked linear cross-entropy (``convret.linear_cross_entropy``).

The driver (convret/ops/linear_cross_entropy.py) multiplies one chunk of hidden states by the vocabulary matrix with the
device's GEMM, then this kernel turns the ``[chunk, V]`` logits into the per-row loss and, in place, into the
logits gradient, so that a chunk's logits buffer is the only vocabulary-sized tensor ever alive:

    lse_i   = log sum_j exp(z_ij)
    loss_i  = lse_i - (1 - eps) z_{i,y_i} - (eps / V) sum_j z_ij          (F.cross_entropy with label_smoothing)
    dz_ij   = scale * (softmax_ij - (1 - eps) [j == y_i] - eps / V)

One program per row, two sweeps over the vocabulary in tiles of BLOCK_V: an online max / sum-exp sweep (also
gathering z_y and sum z), then the gradient sweep. Arithmetic is fp32 whatever the logits dtype; no ``tl.dot``,
so the interpreter (``TRITON_INTERPRET=1``) is exact for every dtype it can load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _cross_entropy_rows(
    LOGITS, LABELS, LOSS,
    stride_row, vocab_size, label_smoothing, grad_scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)  # per-lane running max (base-2 units)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane running sum of exp2(z * log2e - m)
    z_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    z_label = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offs
        in_vocab = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
        z2 = z * LOG2E
        m_new = tl.maximum(m, z2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.math.exp2(m - m_safe) + tl.math.exp2(z2 - m_safe)
        m = m_new
        z_sum += tl.where(in_vocab, z, 0.0)
        z_label += tl.where(cols == label, z, 0.0)
    m_row = tl.max(m, 0)
    s_row = tl.sum(s * tl.math.exp2(m - m_row), 0)
    lse = (m_row + tl.math.log2(s_row)) * LN2
    z_y = tl.sum(z_label, 0)
    loss = lse - (1.0 - label_smoothing) * z_y - (label_smoothing / vocab_size) * tl.sum(z_sum, 0)
    tl.store(LOSS + row, loss)

    if WRITE_GRAD:
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            in_vocab = cols < vocab_size
            z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
            grad = tl.math.exp2(z * LOG2E - lse * LOG2E) - label_smoothing / vocab_size
            grad = tl.where(cols == label, grad - (1.0 - label_smoothing), grad) * grad_scale
            tl.store(row_ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=in_vocab)


def cross_entropy_rows_triton(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, grad_scale: float | None
) -> torch.Tensor:
    """Per-row loss of ``logits [N, V]`` (contiguous rows) against ``labels [N]`` (all valid).

    With ``grad_scale`` not None, overwrites ``logits`` with ``grad_scale * d loss_i / d logits``.
    Returns the fp32 per-row loss ``[N]``."""
    assert logits.dim() == 2 and logits.stride(1) == 1
    num_rows, vocab_size = logits.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return loss
    block_v = min(4096, triton.next_power_of_2(vocab_size))
    _cross_entropy_rows[(num_rows,)](
        logits, labels.contiguous(), loss,
        logits.stride(0), vocab_size, float(label_smoothing), float(grad_scale or 0.0),
        WRITE_GRAD=grad_scale is not None, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss


def aot_specs() -> list[dict]:
    """The kernel at its default config for each dtype, for the ahead-of-time compile check (``convret.aot``)."""
    specs = []
    for type_name in ("fp16", "bf16", "fp32"):
        for write_grad in (False, True):
            specs.append({
                "name": f"cross_entropy_rows[{type_name},grad={int(write_grad)},v4096]",
                "fn": _cross_entropy_rows,
                "signature": {"LOGITS": "*" + type_name, "LABELS": "*i64", "LOSS": "*fp32", "stride_row": "i32",
                              "vocab_size": "i32", "label_smoothing": "fp32", "grad_scale": "fp32",
                              "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr"},
                "constexprs": {"WRITE_GRAD": write_grad, "BLOCK_V": 4096},
                "num_warps": 8, "num_stages": 1,
            })
    return specs
