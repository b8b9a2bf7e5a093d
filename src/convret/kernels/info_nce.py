"""Triton kernels for InfoNCE over in-batch and hard negatives (forward + backward), O(Q + P) memory.

Scores ``s_ij = q_i . p_j / tau`` are built tile by tile, ``[BLOCK_M queries] x [BLOCK_N passages]``, with an
inner loop over the embedding size in ``BLOCK_D`` slices (D is a runtime value: 768 .. 4096 and more).

- Forward: one program per query tile walks all passage tiles with an online max / sum-exp (base 2) and
  stores only the per-query log-sum-exp and loss.
- Backward: ``dloss/ds_ij = w_i (p_ij - y_ij)`` with ``p_ij = exp(s_ij - lse_i)`` and ``w_i`` the incoming
  gradient of row i. One kernel per query tile writes dQ, one per passage tile writes dP; each recomputes the
  score tiles it needs. Every output row belongs to exactly one program, so there are no atomics and the
  result is deterministic. The fp32 accumulators of dQ / dP live in global memory (a ``[BLOCK_M, D]``
  register accumulator does not fit for LLM-sized D); each program updates its own rows slice by slice.
- Temperature: ``dL/dtau = -(1/tau) sum_ij w_i (p_ij - y_ij) s_ij``; the dQ kernel writes the per-row sums.

False negatives (``passage_ids``): passage j is left out of row i when ``ids[j] == ids[label_i]`` and
``j != label_i``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _row_base(base, first, stride):
    """``base + first * stride`` with the product in int64: ``P x D`` passes 2^31 elements at 2M passages of
    dim 1024, where int32 arithmetic would wrap; the per-element offsets inside a tile stay 32-bit."""
    return base + tl.cast(first, tl.int64) * stride


@triton.jit
def _score_tile(
    Q, P, m_first, n_first, num_queries, num_passages, dim, stride_qm, stride_pn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32 tile of ``Q @ P^T`` (unscaled), rows ``m_first + [0, BLOCK_M)`` by columns
    ``n_first + [0, BLOCK_N)``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n = n_first + tl.arange(0, BLOCK_N)
    q_ptrs = _row_base(Q, m_first, stride_qm) + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :]
    # transposed: [BLOCK_D, BLOCK_N]
    p_ptrs = _row_base(P, n_first, stride_pn) + tl.arange(0, BLOCK_N)[None, :] * stride_pn + offs_d[:, None]
    row_ok = offs_m[:, None] < num_queries
    col_ok = offs_n[None, :] < num_passages
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d_first in range(0, dim, BLOCK_D):
        d_ok = (d_first + offs_d) < dim
        q = tl.load(q_ptrs + d_first, mask=row_ok & d_ok[None, :], other=0.0)
        p_t = tl.load(p_ptrs + d_first, mask=col_ok & d_ok[:, None], other=0.0)
        acc = tl.dot(q, p_t, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _candidate_mask(offs_n, num_passages, label, IDS, pos_id, HAS_IDS: tl.constexpr):
    """(is_positive, counts_in_denominator), both ``[BLOCK_M, BLOCK_N]``."""
    col_ok = offs_n < num_passages
    is_pos = offs_n[None, :] == label[:, None]
    valid = col_ok[None, :] & (is_pos | (label[:, None] >= 0))
    if HAS_IDS:
        ids = tl.load(IDS + offs_n, mask=col_ok, other=0)
        valid = valid & ((ids[None, :] != pos_id[:, None]) | is_pos)
    return is_pos, valid


@triton.jit
def _positives(LABELS, POS_IDS, offs_m, row_ok, HAS_IDS: tl.constexpr):
    """Per query row: the positive's passage index, and its passage id (the index itself without ids)."""
    label = tl.load(LABELS + offs_m, mask=row_ok, other=-1)
    pos_id = label
    if HAS_IDS:
        pos_id = tl.load(POS_IDS + offs_m, mask=row_ok, other=0)
    return label, pos_id


@triton.jit
def _info_nce_fwd(
    Q, P, LABELS, IDS, POS_IDS, LSE, LOSS,
    num_queries, num_passages, dim, stride_qm, stride_pn, scale_log2,
    HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    m_first = tl.program_id(0) * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_queries
    label, pos_id = _positives(LABELS, POS_IDS, offs_m, row_ok, HAS_IDS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_score = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n_first in range(0, num_passages, BLOCK_N):
        offs_n = n_first + tl.arange(0, BLOCK_N)
        s = _score_tile(Q, P, m_first, n_first, num_queries, num_passages, dim, stride_qm,
                        stride_pn, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION) * scale_log2
        is_pos, valid = _candidate_mask(offs_n, num_passages, label, IDS, pos_id, HAS_IDS)
        pos_score += tl.sum(tl.where(is_pos, s, 0.0), 1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no candidate seen yet: exp2 gives 0, not NaN
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # base 2; a real row always counts its positive (l_i >= 1), padding rows have l_i == 0 and are not stored
    lse = m_i + tl.math.log2(tl.where(row_ok, l_i, 1.0))
    tl.store(LSE + offs_m, lse, mask=row_ok)
    tl.store(LOSS + offs_m, (lse - pos_score) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _dscores_tile(s, lse, weight, is_pos, valid):
    """``w_i (p_ij - y_ij)`` for a base-2 score tile; zero outside the candidates."""
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    return weight[:, None] * (p - tl.where(is_pos, 1.0, 0.0))


@triton.jit
def _info_nce_bwd_dq(
    Q, P, LABELS, IDS, POS_IDS, LSE, WEIGHT, DQ, TAU_TERMS,
    num_queries, num_passages, dim, stride_qm, stride_pn, scale_log2, grad_scale,
    HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``DQ [Q, D]`` fp32, zero on entry: ``dq_i = grad_scale * sum_j g_ij p_j``; ``TAU_TERMS[i] =
    sum_j g_ij s_ij`` in base-2 score units."""
    m_first = tl.program_id(0) * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    label, pos_id = _positives(LABELS, POS_IDS, offs_m, row_ok, HAS_IDS)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    weight = tl.load(WEIGHT + offs_m, mask=row_ok, other=0.0)
    dq_ptrs = _row_base(DQ, m_first, dim) + tl.arange(0, BLOCK_M)[:, None] * dim + offs_d[None, :]

    tau_terms = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n_first in range(0, num_passages, BLOCK_N):
        offs_n = n_first + tl.arange(0, BLOCK_N)
        s = _score_tile(Q, P, m_first, n_first, num_queries, num_passages, dim, stride_qm,
                        stride_pn, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION) * scale_log2
        is_pos, valid = _candidate_mask(offs_n, num_passages, label, IDS, pos_id, HAS_IDS)
        g = _dscores_tile(s, lse, weight, is_pos, valid)
        tau_terms += tl.sum(tl.where(valid, g * s, 0.0), 1)
        g = g.to(P.dtype.element_ty)
        col_ok = offs_n[:, None] < num_passages
        p_ptrs = _row_base(P, n_first, stride_pn) + tl.arange(0, BLOCK_N)[:, None] * stride_pn + offs_d[None, :]
        for d_first in range(0, dim, BLOCK_D):
            d_ok = (d_first + offs_d) < dim
            p = tl.load(p_ptrs + d_first, mask=col_ok & d_ok[None, :], other=0.0)
            out_mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(dq_ptrs + d_first, mask=out_mask, other=0.0)
            acc += tl.dot(g, p, input_precision=INPUT_PRECISION) * grad_scale
            tl.store(dq_ptrs + d_first, acc, mask=out_mask)
    tl.store(TAU_TERMS + offs_m, tau_terms, mask=row_ok)


@triton.jit
def _info_nce_bwd_dp(
    Q, P, LABELS, IDS, POS_IDS, LSE, WEIGHT, DP,
    num_queries, num_passages, dim, stride_qm, stride_pn, scale_log2, grad_scale,
    HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``DP [P, D]`` fp32, zero on entry: ``dp_j = grad_scale * sum_i g_ij q_i``."""
    n_first = tl.program_id(0) * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < num_passages
    dp_ptrs = _row_base(DP, n_first, dim) + tl.arange(0, BLOCK_N)[:, None] * dim + offs_d[None, :]
    for m_first in range(0, num_queries, BLOCK_M):
        offs_m = m_first + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_queries
        label, pos_id = _positives(LABELS, POS_IDS, offs_m, row_ok, HAS_IDS)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        weight = tl.load(WEIGHT + offs_m, mask=row_ok, other=0.0)
        s = _score_tile(Q, P, m_first, n_first, num_queries, num_passages, dim, stride_qm,
                        stride_pn, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION) * scale_log2
        is_pos, valid = _candidate_mask(offs_n, num_passages, label, IDS, pos_id, HAS_IDS)
        g_t = tl.trans(_dscores_tile(s, lse, weight, is_pos, valid).to(Q.dtype.element_ty))
        q_ptrs = _row_base(Q, m_first, stride_qm) + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :]
        for d_first in range(0, dim, BLOCK_D):
            d_ok = (d_first + offs_d) < dim
            q = tl.load(q_ptrs + d_first, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            out_mask = col_ok[:, None] & d_ok[None, :]
            acc = tl.load(dp_ptrs + d_first, mask=out_mask, other=0.0)
            acc += tl.dot(g_t, q, input_precision=INPUT_PRECISION) * grad_scale
            tl.store(dp_ptrs + d_first, acc, mask=out_mask)


# ---------------------------------------------------------------------------------------------- launch
# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per kernel, for fp16 / bf16 and for fp32 (twice the
# bytes per element, so thinner D slices). All compile without spills for sm_80 and sm_90 (aot_specs()), both
# as compiled ahead of time without alignment hints and with the 16-byte divisibility hints the JIT adds when
# pointers and row strides allow (D a multiple of 8 for fp16): the hinted build vectorises its loads,
# pipelines its D loop, and needs far fewer registers.
CONFIGS = {
    "half": {"fwd": (128, 64, 32, 8, 3), "dq": (64, 64, 32, 8, 2), "dp": (64, 64, 32, 8, 2)},
    "fp32": {"fwd": (128, 64, 16, 8, 3), "dq": (64, 32, 16, 8, 2), "dp": (64, 64, 16, 8, 2)},
}


def default_configs(dtype: torch.dtype) -> dict[str, tuple[int, int, int, int, int]]:
    return CONFIGS["fp32" if dtype == torch.float32 else "half"]


def input_precision(dtype: torch.dtype) -> str:
    """fp16 / bf16 run on tensor cores natively; fp32 asks for 3xTF32 (plain TF32 would cost about 1e-3
    relative error on the GPU; the interpreter multiplies in exact fp32 either way)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _common_args(queries, passages):
    return (queries.shape[0], passages.shape[0], queries.shape[1], queries.stride(0), passages.stride(0))


def _forward(queries, passages, inv_tau, labels, ids, pos_ids, config):
    block_m, block_n, block_d, num_warps, num_stages = config
    num_queries = queries.shape[0]
    lse = torch.empty(num_queries, device=queries.device, dtype=torch.float32)
    loss = torch.empty(num_queries, device=queries.device, dtype=torch.float32)
    _info_nce_fwd[(triton.cdiv(num_queries, block_m),)](
        queries, passages, labels, ids, pos_ids, lse, loss, *_common_args(queries, passages), inv_tau * LOG2E,
        HAS_IDS=ids is not labels, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        INPUT_PRECISION=input_precision(queries.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return lse, loss


def _backward(queries, passages, inv_tau, labels, ids, pos_ids, lse, row_weights, configs,
              need_dq, need_dp, need_dtau):
    # Fold the largest |w_i| out of the weights: the fp16 operand of the gradient GEMMs then holds
    # (p - y) * w_i / max|w| in [-1, 1] instead of values like p / (Q * tau) that would fall into subnormals.
    max_weight = row_weights.abs().max()
    norm_weights = (row_weights / torch.where(max_weight > 0, max_weight, 1.0)).contiguous()
    grad_scale = max_weight.item() * inv_tau
    common = _common_args(queries, passages)
    precision = input_precision(queries.dtype)
    has_ids = ids is not labels
    dq = dp = dtau = None
    if need_dq or need_dtau:
        block_m, block_n, block_d, num_warps, num_stages = configs["dq"]
        dq = torch.zeros(queries.shape, device=queries.device, dtype=torch.float32)
        tau_terms = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
        _info_nce_bwd_dq[(triton.cdiv(queries.shape[0], block_m),)](
            queries, passages, labels, ids, pos_ids, lse, norm_weights, dq, tau_terms, *common,
            inv_tau * LOG2E, grad_scale,
            HAS_IDS=has_ids, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, INPUT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )
        # tau_terms_i = sum_j g_ij s_ij / (max|w| ln 2); dL/dtau = -(1/tau) sum_i max|w| tau_terms_i ln 2
        dtau = tau_terms.sum() * (-inv_tau * LN2) * max_weight
    if need_dp:
        block_m, block_n, block_d, num_warps, num_stages = configs["dp"]
        dp = torch.zeros(passages.shape, device=passages.device, dtype=torch.float32)
        _info_nce_bwd_dp[(triton.cdiv(passages.shape[0], block_n),)](
            queries, passages, labels, ids, pos_ids, lse, norm_weights, dp, *common, inv_tau * LOG2E, grad_scale,
            HAS_IDS=has_ids, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, INPUT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )
    return dq, dp, dtau


class TritonInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, passages, temperature, labels, passage_ids, reduction, configs):
        inv_tau = 1.0 / temperature.item()
        ids, pos_ids = (labels, labels) if passage_ids is None else (passage_ids, passage_ids[labels].contiguous())
        lse, losses = _forward(queries, passages, inv_tau, labels, ids, pos_ids, configs["fwd"])
        ctx.save_for_backward(queries, passages, temperature, labels, ids, pos_ids, lse)
        ctx.reduction, ctx.configs, ctx.inv_tau = reduction, configs, inv_tau
        if reduction == "mean":
            return losses.mean()
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        queries, passages, temperature, labels, ids, pos_ids, lse = ctx.saved_tensors
        need_dq, need_dp, need_dtau = ctx.needs_input_grad[:3]
        num_queries = queries.shape[0]
        grad_output = grad_output.float()
        if ctx.reduction == "none":
            row_weights = grad_output.contiguous()
        else:
            row_weights = (grad_output / num_queries if ctx.reduction == "mean" else grad_output).expand(num_queries)
        dq, dp, dtau = _backward(queries, passages, ctx.inv_tau, labels, ids, pos_ids, lse, row_weights,
                                 ctx.configs, need_dq, need_dp, need_dtau)
        dq = dq.to(queries.dtype) if need_dq else None
        dp = dp.to(passages.dtype) if need_dp else None
        dtau = dtau.to(temperature.dtype).reshape(temperature.shape) if need_dtau else None
        return dq, dp, dtau, None, None, None, None


def info_nce_triton(queries, passages, temperature, labels, passage_ids, reduction, configs=None):
    """Launch the kernels; arguments are validated by :func:`convret.info_nce`. ``configs`` overrides
    :func:`default_configs` (tests use small tiles)."""
    if configs is None:
        configs = default_configs(queries.dtype)
    # int32 index tiles halve the registers of the [BLOCK_M, BLOCK_N] masks; ids are renumbered densely so
    # that arbitrary int64 ids (hashes) fit
    labels = labels.to(torch.int32).contiguous()
    # the kernels read rows with unit stride along D (vector loads); the row stride is free
    queries, passages = (t if t.stride(1) == 1 else t.contiguous() for t in (queries, passages))
    if passage_ids is not None:
        passage_ids = torch.unique(passage_ids, return_inverse=True)[1].to(torch.int32).contiguous()
    return TritonInfoNCE.apply(queries, passages, temperature.to(queries.device), labels, passage_ids, reduction,
                               configs)


def aot_specs() -> list[dict]:
    """Every kernel in each default config, per input dtype, for ahead-of-time compilation checks:
    ``triton.compile(ASTSource(spec["fn"], spec["signature"], spec["constexprs"]), target=...)``."""
    specs = []
    for dtype_name, ptr_type, config_key in (("fp16", "*fp16", "half"), ("bf16", "*bf16", "half"),
                                             ("fp32", "*fp32", "fp32")):
        precision = "tf32x3" if dtype_name == "fp32" else "ieee"
        for kernel_name, fn in (("fwd", _info_nce_fwd), ("dq", _info_nce_bwd_dq), ("dp", _info_nce_bwd_dp)):
            block_m, block_n, block_d, num_warps, num_stages = CONFIGS[config_key][kernel_name]
            for has_ids in (False, True):
                signature = {"Q": ptr_type, "P": ptr_type, "LABELS": "*i32", "IDS": "*i32", "POS_IDS": "*i32",
                             "LSE": "*fp32"}
                if kernel_name == "fwd":
                    signature["LOSS"] = "*fp32"
                else:
                    signature["WEIGHT"] = "*fp32"
                    signature["DQ" if kernel_name == "dq" else "DP"] = "*fp32"
                    if kernel_name == "dq":
                        signature["TAU_TERMS"] = "*fp32"
                for name in ("num_queries", "num_passages", "dim", "stride_qm", "stride_pn"):
                    signature[name] = "i32"
                signature["scale_log2"] = "fp32"
                if kernel_name != "fwd":
                    signature["grad_scale"] = "fp32"
                constexprs = {"HAS_IDS": has_ids, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
                              "INPUT_PRECISION": precision}
                for name in constexprs:
                    signature[name] = "constexpr"
                specs.append({
                    "name": f"info_nce_{kernel_name}_{dtype_name}{'_ids' if has_ids else ''}",
                    "fn": fn, "signature": signature, "constexprs": constexprs,
                    "num_warps": num_warps, "num_stages": num_stages,
                })
    return specs
