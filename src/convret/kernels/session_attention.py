"""Triton kernels for session-masked attention (forward + backward), driven by a SessionLayout.

The mask is one int32 per key, ``mask_start[b, j]``: query row q sees key j iff ``j <= q < mask_start[b, j]``.
Per key tile we also get ``min`` / ``max`` of mask_start (``SessionLayout.tile_bounds``), which classify each
(query tile, key tile) pair without touching K or V:

- skipped: ``k_first > q_last`` (causal) or ``tile_max <= q_first`` (every key is hidden from every query);
  the tile is never loaded;
- full: ``k_last <= q_first`` and ``tile_min > q_last``; no mask arithmetic at all;
- partial: everything else; the element mask is computed from mask_start.

A sliding window of ``w`` keys (query q also needs ``q - j < w``) is a runtime argument with a constexpr flag,
``HAS_WINDOW``: without it the compiled kernels are the window-free ones. With it, the key loops start at the first
tile the tile's first query can reach, the dK / dV loop over query tiles ends at the last query that can see the
tile's last key, "full" also needs ``k_first > q_last - w``, and the element mask gains ``j > q - w``.

Forward: flash-attention-2 online softmax in fp32, base-2 exponentials, the row log-sum-exp kept for the
backward. Backward: one kernel for dK/dV (one program per key tile and KV head, looping over the query heads
of its GQA group, so no atomics: deterministic), one for dQ. Rows with no visible key (padding) produce zeros
and zero gradients: their log-sum-exp is stored as +inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _head_offset(batch, head, stride_b, stride_h):
    """Element offset of (batch, head) in a [B, H, L, D] tensor, in int64: ``B * stride_b`` passes 2^31
    elements at 4 GiB of bf16, where int32 arithmetic would wrap and touch the wrong memory."""
    return tl.cast(batch, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h


@triton.jit
def _row_offset(first, stride_l):
    """Element offset of row ``first`` (int64: a [B, L, H, D] view's ``L * H * D`` may pass 2^31 too)."""
    return tl.cast(first, tl.int64) * stride_l


@triton.jit
def _dense_row_offset(batch, head, num_heads, seq_len, first, row_size):
    """Offset of row ``first`` of head ``head`` in a contiguous [B, H, L, row_size] buffer, in int64."""
    return ((tl.cast(batch, tl.int64) * num_heads + head) * seq_len + first) * row_size


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, PADDED: tl.constexpr):
    """Load a [rows, BLOCK_D] block; masked rows and the padding columns past HEAD_DIM read as 0."""
    if MASK_ROWS:
        if PADDED:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif PADDED:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_cols(ptrs, cols_ok, d_ok, MASK_COLS: tl.constexpr, PADDED: tl.constexpr):
    """Load a transposed [BLOCK_D, cols] block (same masking as :func:`_load_rows`)."""
    if MASK_COLS:
        if PADDED:
            x = tl.load(ptrs, mask=cols_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    elif PADDED:
        x = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(ptrs, x, rows_ok, d_ok, PADDED: tl.constexpr):
    if PADDED:
        tl.store(ptrs, x, mask=rows_ok[:, None] & d_ok[None, :])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None])


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first, seq_len,
    qk_scale, stride_kl, stride_vl, window,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PADDED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    offs_n = k_first + tl.arange(0, BLOCK_N)
    in_bounds = offs_n < seq_len
    k = _load_cols(k_ptrs + _row_offset(k_first, stride_kl), in_bounds, d_ok, MASKED, PADDED)
    qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
    if MASKED:
        mask_start = tl.load(mask_start_ptr + offs_n, mask=in_bounds, other=0)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < mask_start[None, :])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row that has seen no visible key yet keeps m = -inf; use 0 so that exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_ptrs + _row_offset(k_first, stride_vl), in_bounds, d_ok, MASKED, PADDED)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _session_attn_fwd(
    Q, K, V, O, LSE, MASK_START, TILE_MIN, TILE_MAX,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mask_b, stride_tile_b,
    seq_len, num_q_heads, group_size, qk_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    # grid (query tiles, Hq, B): no B * Hq axis, whose 65535 limit a large batch would pass
    q_tile = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    q_first = q_tile * BLOCK_M
    q_last = q_first + BLOCK_M - 1
    offs_tile = tl.arange(0, BLOCK_M)
    offs_m = q_first + offs_tile
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seq_len

    q_ptrs = (Q + _head_offset(batch, head, stride_qb, stride_qh) + _row_offset(q_first, stride_ql)
              + offs_tile[:, None] * stride_ql + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, row_ok, d_ok, True, PADDED)
    # K is read transposed ([BLOCK_D, BLOCK_N]); both pointer blocks start at key 0 and move by k_first rows
    k_ptrs = (K + _head_offset(batch, kv_head, stride_kb, stride_kh)
              + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd)
    v_ptrs = (V + _head_offset(batch, kv_head, stride_vb, stride_vh)
              + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd)
    mask_start_ptr = MASK_START + batch * stride_mask_b
    tile_min_ptr = TILE_MIN + batch * stride_tile_b
    tile_max_ptr = TILE_MAX + batch * stride_tile_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # causality bounds the loop: key tiles that start after the last query row are never visited; a window
    # bounds it below: tiles whose last key is too old for the first query row neither
    num_k_tiles = tl.minimum(tl.cdiv(seq_len, BLOCK_N), q_last // BLOCK_N + 1)
    first_k_tile = 0
    if HAS_WINDOW:
        first_k_tile = tl.maximum(q_first - window + 1, 0) // BLOCK_N
    for k_tile in range(first_k_tile, num_k_tiles):
        tile_max = tl.load(tile_max_ptr + k_tile)
        if tile_max > q_first:  # otherwise skipped: every key of the tile is hidden from every query row
            k_first = k_tile * BLOCK_N
            tile_min = tl.load(tile_min_ptr + k_tile)
            full = (k_first + BLOCK_N - 1 <= q_first) & (tile_min > q_last)
            if HAS_WINDOW:
                full = full & (k_first > q_last - window)
            if full:
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first,
                                          seq_len, qk_scale, stride_kl, stride_vl, window,
                                          BLOCK_N, False, PADDED, INPUT_PRECISION, HAS_WINDOW)
            else:
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first,
                                          seq_len, qk_scale, stride_kl, stride_vl, window,
                                          BLOCK_N, True, PADDED, INPUT_PRECISION, HAS_WINDOW)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    o_ptrs = (O + _head_offset(batch, head, stride_ob, stride_oh) + _row_offset(q_first, stride_ol)
              + offs_tile[:, None] * stride_ol + offs_d[None, :] * stride_od)
    _store_rows(o_ptrs, out.to(O.dtype.element_ty), row_ok, d_ok, PADDED)
    tl.store(LSE + _dense_row_offset(batch, head, num_q_heads, seq_len, q_first, 1) + offs_tile, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, mask_start, offs_n, d_ok, q_first, seq_len,
    qk_scale, stride_ql, stride_dol, window,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PADDED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    offs_m = q_first + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    q = _load_rows(q_ptrs + _row_offset(q_first, stride_ql), row_ok, d_ok, True, PADDED)
    do = _load_rows(do_ptrs + _row_offset(q_first, stride_dol), row_ok, d_ok, True, PADDED)
    lse = tl.load(LSE_row + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_row + offs_m, mask=row_ok, other=0.0)
    # transposed scores [BLOCK_N, BLOCK_M]: keys along rows, queries along columns
    qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
    p_t = tl.math.exp2(qk_t - lse[None, :])
    if MASKED:
        visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < mask_start[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_n[:, None] > offs_m[None, :] - window)
        p_t = tl.where(visible, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _session_attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK_START, TILE_MIN, TILE_MAX,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_mask_b, stride_tile_b,
    seq_len, num_q_heads, num_kv_heads, group_size, qk_scale, sm_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    k_tile = tl.program_id(0)  # grid (key tiles, Hkv, B)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    k_first = k_tile * BLOCK_N
    k_last = k_first + BLOCK_N - 1
    offs_tile = tl.arange(0, BLOCK_N)
    offs_n = k_first + offs_tile
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    key_ok = offs_n < seq_len

    k = _load_rows(K + _head_offset(batch, kv_head, stride_kb, stride_kh) + _row_offset(k_first, stride_kl)
                   + offs_tile[:, None] * stride_kl + offs_d[None, :] * stride_kd, key_ok, d_ok, True, PADDED)
    v = _load_rows(V + _head_offset(batch, kv_head, stride_vb, stride_vh) + _row_offset(k_first, stride_vl)
                   + offs_tile[:, None] * stride_vl + offs_d[None, :] * stride_vd, key_ok, d_ok, True, PADDED)
    mask_start = tl.load(MASK_START + batch * stride_mask_b + offs_n, mask=key_ok, other=0)
    tile_min = tl.load(TILE_MIN + batch * stride_tile_b + k_tile)
    tile_max = tl.load(TILE_MAX + batch * stride_tile_b + k_tile)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # only query rows in [k_first, tile_max) can see a key of this tile (with a window, also rows before
    # k_last + window): that range bounds the loop
    first_q_tile = k_first // BLOCK_M
    end_row = tl.minimum(tile_max, seq_len)
    if HAS_WINDOW:
        end_row = tl.minimum(end_row, k_last + window)
    end_q_tile = tl.cdiv(end_row, BLOCK_M)
    for group_index in range(0, group_size):
        head = kv_head * group_size + group_index
        q_ptrs = (Q + _head_offset(batch, head, stride_qb, stride_qh)
                  + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd)
        do_ptrs = (DO + _head_offset(batch, head, stride_dob, stride_doh)
                   + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod)
        LSE_row = LSE + _dense_row_offset(batch, head, num_q_heads, seq_len, 0, 1)
        DELTA_row = DELTA + _dense_row_offset(batch, head, num_q_heads, seq_len, 0, 1)
        for q_tile in range(first_q_tile, end_q_tile):
            q_first = q_tile * BLOCK_M
            full = (k_last <= q_first) & (tile_min > q_first + BLOCK_M - 1)
            if HAS_WINDOW:
                full = full & (k_first > q_first + BLOCK_M - 1 - window)
            if full:
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, mask_start, offs_n, d_ok,
                                        q_first, seq_len, qk_scale, stride_ql, stride_dol, window,
                                        BLOCK_M, False, PADDED, INPUT_PRECISION, HAS_WINDOW)
            else:
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, mask_start, offs_n, d_ok,
                                        q_first, seq_len, qk_scale, stride_ql, stride_dol, window,
                                        BLOCK_M, True, PADDED, INPUT_PRECISION, HAS_WINDOW)

    # DK, DV: contiguous [B, Hkv, L, HEAD_DIM]
    # (pointer + int64 scalar) + int32 block: the per-element offsets stay 32-bit
    dense_offset = _dense_row_offset(batch, kv_head, num_kv_heads, seq_len, k_first, HEAD_DIM)
    tile_offsets = offs_tile[:, None] * HEAD_DIM + offs_d[None, :]
    _store_rows(DK + dense_offset + tile_offsets, (dk * sm_scale).to(DK.dtype.element_ty), key_ok, d_ok, PADDED)
    _store_rows(DV + dense_offset + tile_offsets, dv.to(DV.dtype.element_ty), key_ok, d_ok, PADDED)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first, seq_len,
    qk_scale, stride_kl, stride_vl, window,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PADDED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    offs_n = k_first + tl.arange(0, BLOCK_N)
    in_bounds = offs_n < seq_len
    k_t = _load_cols(k_ptrs + _row_offset(k_first, stride_kl), in_bounds, d_ok, MASKED, PADDED)
    v_t = _load_cols(v_ptrs + _row_offset(k_first, stride_vl), in_bounds, d_ok, MASKED, PADDED)
    qk = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        mask_start = tl.load(mask_start_ptr + offs_n, mask=in_bounds, other=0)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < mask_start[None, :])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _session_attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, MASK_START, TILE_MIN, TILE_MAX,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_mask_b, stride_tile_b,
    seq_len, num_q_heads, group_size, qk_scale, sm_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    q_tile = tl.program_id(0)  # grid (query tiles, Hq, B)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    q_first = q_tile * BLOCK_M
    q_last = q_first + BLOCK_M - 1
    offs_tile = tl.arange(0, BLOCK_M)
    offs_m = q_first + offs_tile
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seq_len

    q = _load_rows(Q + _head_offset(batch, head, stride_qb, stride_qh) + _row_offset(q_first, stride_ql)
                   + offs_tile[:, None] * stride_ql + offs_d[None, :] * stride_qd, row_ok, d_ok, True, PADDED)
    do = _load_rows(DO + _head_offset(batch, head, stride_dob, stride_doh) + _row_offset(q_first, stride_dol)
                    + offs_tile[:, None] * stride_dol + offs_d[None, :] * stride_dod, row_ok, d_ok, True, PADDED)
    row_offset = _dense_row_offset(batch, head, num_q_heads, seq_len, q_first, 1)
    lse = tl.load(LSE + row_offset + offs_tile, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_offset + offs_tile, mask=row_ok, other=0.0)
    k_ptrs = (K + _head_offset(batch, kv_head, stride_kb, stride_kh)
              + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd)
    v_ptrs = (V + _head_offset(batch, kv_head, stride_vb, stride_vh)
              + offs_n[None, :] * stride_vl + offs_d[:, None] * stride_vd)
    mask_start_ptr = MASK_START + batch * stride_mask_b
    tile_min_ptr = TILE_MIN + batch * stride_tile_b
    tile_max_ptr = TILE_MAX + batch * stride_tile_b

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    num_k_tiles = tl.minimum(tl.cdiv(seq_len, BLOCK_N), q_last // BLOCK_N + 1)
    first_k_tile = 0
    if HAS_WINDOW:
        first_k_tile = tl.maximum(q_first - window + 1, 0) // BLOCK_N
    for k_tile in range(first_k_tile, num_k_tiles):
        tile_max = tl.load(tile_max_ptr + k_tile)
        if tile_max > q_first:
            k_first = k_tile * BLOCK_N
            tile_min = tl.load(tile_min_ptr + k_tile)
            full = (k_first + BLOCK_N - 1 <= q_first) & (tile_min > q_last)
            if HAS_WINDOW:
                full = full & (k_first > q_last - window)
            if full:
                dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first,
                                  seq_len, qk_scale, stride_kl, stride_vl, window, BLOCK_N, False, PADDED,
                                  INPUT_PRECISION, HAS_WINDOW)
            else:
                dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_start_ptr, offs_m, d_ok, k_first,
                                  seq_len, qk_scale, stride_kl, stride_vl, window, BLOCK_N, True, PADDED,
                                  INPUT_PRECISION, HAS_WINDOW)

    # DQ: contiguous [B, Hq, L, HEAD_DIM]
    dq_ptrs = (DQ + _dense_row_offset(batch, head, num_q_heads, seq_len, q_first, HEAD_DIM)
               + offs_tile[:, None] * HEAD_DIM + offs_d[None, :])
    _store_rows(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), row_ok, d_ok, PADDED)


# ---------------------------------------------------------------------------------------------- launch
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim BLOCK_D (the next power of two of D,
# at least 16, the smallest tl.dot operand), picked for A100 (sm_80) and H100 (sm_90): each compiles for both
# without spills (`python -m convret.aot`, tests/test_aot_compile.py). BLOCK_M counts query rows and BLOCK_N
# keys in every kernel. fp32 tiles hold twice the bytes, hence their own, smaller tiles.
CONFIGS_16BIT = {
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3),
            256: (64, 32, 8, 2)},
    "dkdv": {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (64, 32, 8, 2),
             256: (32, 32, 8, 1)},
    "dq": {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (128, 32, 8, 3), 128: (64, 32, 8, 2),
           256: (32, 16, 8, 1)},
}
CONFIGS_FP32 = {
    "fwd": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 8, 2), 256: (32, 32, 8, 1)},
    "dkdv": {16: (32, 32, 8, 2), 32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 1)},
    "dq": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 8, 2), 256: (16, 16, 8, 1)},
}
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (heads and batch); axis 0 (tiles) goes to 2^31 - 1


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the power of two the kernels compute at; columns past ``head_dim`` are masked loads / stores."""
    return max(16, triton.next_power_of_2(head_dim))


def default_configs(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel for this head dim and dtype."""
    block_d = padded_head_dim(head_dim)
    table = CONFIGS_FP32 if dtype == torch.float32 else CONFIGS_16BIT
    if block_d not in table["fwd"]:
        raise ValueError(f"unsupported head dim {head_dim}: the Triton kernels take multiples of 8 up to 256")
    return {kernel: configs[block_d] for kernel, configs in table.items()}


def input_precision(dtype: torch.dtype) -> str:
    """What ``tl.dot`` is asked for. fp16 / bf16 run on tensor cores as they are. fp32 runs TF32 products on
    the GPU (about 1e-3 relative error, what torch does for fp32 matmuls with allow_tf32): 3xTF32 would be
    closer to fp32 but spills registers at every tile size tried for sm_80 and sm_90 (`convret.aot`). The
    Triton interpreter multiplies in exact fp32 whatever is asked."""
    return "tf32" if dtype == torch.float32 else "ieee"


def _check_grid(batch: int, num_q_heads: int) -> None:
    if batch > MAX_GRID_YZ or num_q_heads > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and head count ({num_q_heads}) must each be at most {MAX_GRID_YZ}, "
                         "the launch grid's limit: split the batch")


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _window_args(window: int | None) -> tuple[int, bool]:
    """(window, HAS_WINDOW) of a launch: 0 and False without a window (the window-free compiled kernel)."""
    return (0, False) if window is None else (int(window), True)


def _forward(q, k, v, layout, scale, config, window=None):
    batch, num_q_heads, seq_len, head_dim = q.shape
    block_m, block_n, num_warps, num_stages = config
    bounds = layout.tile_bounds(block_n)
    out = torch.empty_like(q)  # q's memory layout: HF's [B, L, H, D] view needs no copy afterwards
    lse = torch.empty(batch, num_q_heads, seq_len, device=q.device, dtype=torch.float32)
    mask_start = layout.mask_start
    _check_grid(batch, num_q_heads)
    grid = (triton.cdiv(seq_len, block_m), num_q_heads, batch)
    window, has_window = _window_args(window)
    _session_attn_fwd[grid](
        q, k, v, out, lse, mask_start, bounds.min_mask_start, bounds.max_mask_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        mask_start.stride(0), bounds.min_mask_start.stride(0),
        seq_len, num_q_heads, num_q_heads // k.shape[1], scale * LOG2E, window,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        INPUT_PRECISION=input_precision(q.dtype), HAS_WINDOW=has_window,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(q, k, v, out, lse, grad_out, layout, scale, dkdv_config, dq_config, window=None):
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_q_heads // num_kv_heads
    precision = input_precision(q.dtype)
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()  # rowsum(dO * O), [B, Hq, L]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    mask_start = layout.mask_start
    window, has_window = _window_args(window)

    block_m, block_n, num_warps, num_stages = dkdv_config
    bounds = layout.tile_bounds(block_n)
    _session_attn_bwd_dkdv[(triton.cdiv(seq_len, block_n), num_kv_heads, batch)](
        q, k, v, grad_out, dk, dv, lse, delta, mask_start, bounds.min_mask_start, bounds.max_mask_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        mask_start.stride(0), bounds.min_mask_start.stride(0),
        seq_len, num_q_heads, num_kv_heads, group_size, scale * LOG2E, scale, window,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        INPUT_PRECISION=precision, HAS_WINDOW=has_window,
        num_warps=num_warps, num_stages=num_stages,
    )
    block_m, block_n, num_warps, num_stages = dq_config
    bounds = layout.tile_bounds(block_n)
    _session_attn_bwd_dq[(triton.cdiv(seq_len, block_m), num_q_heads, batch)](
        q, k, v, grad_out, dq, lse, delta, mask_start, bounds.min_mask_start, bounds.max_mask_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        mask_start.stride(0), bounds.min_mask_start.stride(0),
        seq_len, num_q_heads, group_size, scale * LOG2E, scale, window,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        INPUT_PRECISION=precision, HAS_WINDOW=has_window,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv


class SessionAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, configs, window):
        out, lse = _forward(q, k, v, layout, scale, configs["fwd"], window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.configs, ctx.window = layout, scale, configs, window
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, ctx.layout, ctx.scale,
                               ctx.configs["dkdv"], ctx.configs["dq"], ctx.window)
        return dq, dk, dv, None, None, None, None


def session_attention_triton(q, k, v, layout, scale, configs=None, window=None):
    """Launch the Triton kernels. ``configs`` overrides :func:`default_configs` (tests use small tiles);
    ``window``: a sliding window of that many keys, or None."""
    if configs is None:
        configs = default_configs(q.shape[-1], q.dtype)
    return SessionAttentionFunction.apply(q, k, v, layout, scale, configs, window)


# Head dims the ahead-of-time check compiles: every BLOCK_D (16 .. 256) at its largest D (no padding) and, for
# 16, 128 and 256, a padded D that exercises the masked loads and stores (8, 80, 96, 136). Register use depends on
# BLOCK_D and the tile config, not on the exact D, so this covers every multiple of 8; `python -m convret.aot
# --all-head-dims` compiles all 32 of them.
AOT_HEAD_DIMS = (8, 16, 32, 64, 80, 96, 128, 136, 256)
ALL_HEAD_DIMS = tuple(range(8, 257, 8))
# The sliding-window build (HAS_WINDOW) adds a few integer operations per tile: it is compiled at the head dim
# with the fewest spare registers, 256, wherever that head dim is checked, for each tile table (bf16 stands for
# fp16, which has the same tiles).
WINDOW_AOT_HEAD_DIMS = (256,)


def aot_specs(head_dims: tuple[int, ...] = AOT_HEAD_DIMS) -> list[dict]:
    """Every kernel at every default config, for the ahead-of-time compile check (``convret.aot``); the
    sliding-window builds at :data:`WINDOW_AOT_HEAD_DIMS`."""
    specs = []
    pointer_args = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    fp32_args = {"LSE", "DELTA"}
    float_args = {"qk_scale", "sm_scale"}
    kernels = {"fwd": _session_attn_fwd, "dkdv": _session_attn_bwd_dkdv, "dq": _session_attn_bwd_dq}
    builds = [(head_dim, False) for head_dim in head_dims]
    builds += [(head_dim, True) for head_dim in head_dims if head_dim in WINDOW_AOT_HEAD_DIMS]
    for dtype, type_name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for head_dim, has_window in builds:
            if has_window and dtype == torch.float16:
                continue
            for kernel_name, (block_m, block_n, num_warps, num_stages) in default_configs(head_dim, dtype).items():
                fn = kernels[kernel_name]
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": padded_head_dim(head_dim), "BLOCK_M": block_m,
                              "BLOCK_N": block_n, "INPUT_PRECISION": input_precision(dtype),
                              "HAS_WINDOW": has_window}
                signature = {}
                for arg in fn.arg_names:
                    if arg in constexprs:
                        signature[arg] = "constexpr"
                    elif arg in pointer_args:
                        signature[arg] = "*" + type_name
                    elif arg in fp32_args:
                        signature[arg] = "*fp32"
                    elif arg.isupper():
                        signature[arg] = "*i32"
                    elif arg in float_args:
                        signature[arg] = "fp32"
                    else:
                        signature[arg] = "i32"
                specs.append({
                    "name": f"session_attn_{kernel_name}[{type_name},d{head_dim},{block_m}x{block_n}"
                            f"{',window' if has_window else ''}]",
                    "fn": fn, "signature": signature, "constexprs": constexprs,
                    "num_warps": num_warps, "num_stages": num_stages,
                })
    return specs


# ------------------------------------------------------------------------------ cached prefill (forward only)
@triton.jit
def _cached_attn_fwd(
    Q, K, V, O, QPOS, MASK_START, TILE_MAX,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_pos_b, stride_mask_b, stride_tile_b,
    q_len, kv_len, group_size, qk_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """The forward of ``convret.ops.session_attention.cached``: query row i of row b stands at key position QPOS[b, i]
    (a cached prefill); the mask is the one that position has in the full row. Key tiles past the tile's last
    query position, or whose keys are all hidden from its first one (or, with a window, too old for it), are
    skipped; the others are masked."""
    q_tile = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size
    PADDED: tl.constexpr = BLOCK_D != HEAD_DIM

    q_first = q_tile * BLOCK_M
    offs_tile = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = (q_first + offs_tile) < q_len
    # padding query rows stand at kv_len: nothing is visible to them
    pos = tl.load(QPOS + batch * stride_pos_b + q_first + offs_tile, mask=row_ok, other=kv_len)
    pos = tl.minimum(pos, kv_len)
    pos_first = tl.min(pos, 0)
    pos_last = tl.max(pos, 0)

    q_ptrs = (Q + _head_offset(batch, head, stride_qb, stride_qh) + _row_offset(q_first, stride_ql)
              + offs_tile[:, None] * stride_ql + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, row_ok, d_ok, True, PADDED)
    k_ptrs = (K + _head_offset(batch, kv_head, stride_kb, stride_kh)
              + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd)
    v_ptrs = (V + _head_offset(batch, kv_head, stride_vb, stride_vh)
              + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd)
    mask_start_ptr = MASK_START + batch * stride_mask_b
    tile_max_ptr = TILE_MAX + batch * stride_tile_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    num_k_tiles = tl.minimum(tl.cdiv(kv_len, BLOCK_N), pos_last // BLOCK_N + 1)
    first_k_tile = 0
    if HAS_WINDOW:
        first_k_tile = tl.maximum(pos_first - window + 1, 0) // BLOCK_N
    for k_tile in range(first_k_tile, num_k_tiles):
        tile_max = tl.load(tile_max_ptr + k_tile)
        if tile_max > pos_first:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_start_ptr, pos, d_ok,
                                      k_tile * BLOCK_N, kv_len, qk_scale, stride_kl, stride_vl, window,
                                      BLOCK_N, True, PADDED, INPUT_PRECISION, HAS_WINDOW)
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    o_ptrs = (O + _head_offset(batch, head, stride_ob, stride_oh) + _row_offset(q_first, stride_ol)
              + offs_tile[:, None] * stride_ol + offs_d[None, :] * stride_od)
    _store_rows(o_ptrs, out.to(O.dtype.element_ty), row_ok, d_ok, PADDED)


def cached_session_attention_triton(q, k, v, layout, query_positions, scale, config=None, window=None):
    """Launch the cached-prefill forward (``convret.ops.session_attention.cached``). ``config``: (BLOCK_M, BLOCK_N,
    num_warps, num_stages), default the forward kernel's; ``window``: a sliding window of that many keys, or
    None."""
    batch, num_q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    block_m, block_n, num_warps, num_stages = config or default_configs(head_dim, q.dtype)["fwd"]
    bounds = layout.tile_bounds(block_n)
    positions = query_positions.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty_like(q)
    _check_grid(batch, num_q_heads)
    grid = (triton.cdiv(q_len, block_m), num_q_heads, batch)
    window, has_window = _window_args(window)
    _cached_attn_fwd[grid](
        q, k, v, out, positions, layout.mask_start, bounds.max_mask_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        positions.stride(0), layout.mask_start.stride(0), bounds.max_mask_start.stride(0),
        q_len, kv_len, num_q_heads // k.shape[1], scale * LOG2E, window,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        INPUT_PRECISION=input_precision(q.dtype), HAS_WINDOW=has_window,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
