"""64-bit offsets in the Triton kernels, proved at sizes past 2^31 elements without allocating them.

The kernels compute every offset that can pass 2^31 elements through the small ``triton.jit`` helpers tested
here (``_head_offset``, ``_row_offset``, ``_dense_row_offset`` of session attention, ``_row_base`` of InfoNCE);
a kernel below calls them with the program ids and strides of a tensor of 2^34 elements and stores what they
return. The same products in int32 wrap (checked too, so that the test can fail), and the launch grid keeps
batch and heads on separate axes (the old ``B * Hq`` axis failed past 65535).
"""
import pytest
import torch
import triton
import triton.language as tl

from conftest import triton_device
from convret import SessionLayout
from convret.kernels import session_attention as sa
from convret.kernels.info_nce import _row_base

# a bf16 q of [B = 4, H = 64, L = 65536, D = 256] (2^32 elements, 8 GiB), or its [B, L, H, D] storage
BATCH, HEADS, SEQ_LEN, HEAD_DIM = 4, 64, 65536, 256
STRIDE_H, STRIDE_B = SEQ_LEN * HEAD_DIM, HEADS * SEQ_LEN * HEAD_DIM  # 2^24, 2^30
STRIDE_L_HF = HEADS * HEAD_DIM  # 2^14: row stride of the transposed [B, L, H, D] storage
FIRST_ROW = 65000  # a tile start row: FIRST_ROW * STRIDE_L_HF = 1.06e9, plus the head offset passes 2^31
FIRST_PASSAGE = 3_000_000  # InfoNCE: passage row 3M of a [P, 1024] matrix


@triton.jit
def _offsets_kernel(OUT, WRAPPED, stride_b, stride_h, stride_l, num_heads, seq_len, row_size, first, passage,
                    passage_stride):
    head = tl.program_id(1)
    batch = tl.program_id(2)
    slot = (batch * num_heads + head) * 4
    tl.store(OUT + slot, sa._head_offset(batch, head, stride_b, stride_h))
    tl.store(OUT + slot + 1, sa._row_offset(first, stride_l) + sa._head_offset(batch, head, stride_b, stride_h))
    tl.store(OUT + slot + 2, sa._dense_row_offset(batch, head, num_heads, seq_len, first, row_size))
    tl.store(OUT + slot + 3, _row_base(0, passage, passage_stride))
    tl.store(WRAPPED + batch * num_heads + head, (batch * stride_b + head * stride_h).to(tl.int64))


def test_offsets_past_2_to_the_31_are_exact():
    device = triton_device()
    out = torch.zeros(BATCH * HEADS * 4, dtype=torch.int64, device=device)
    wrapped = torch.zeros(BATCH * HEADS, dtype=torch.int64, device=device)
    _offsets_kernel[(1, HEADS, BATCH)](out, wrapped, STRIDE_B, STRIDE_H, STRIDE_L_HF, HEADS, SEQ_LEN, HEAD_DIM,
                                       FIRST_ROW, FIRST_PASSAGE, 1024)
    out, wrapped = out.view(BATCH, HEADS, 4).cpu(), wrapped.view(BATCH, HEADS).cpu()
    want = torch.zeros(BATCH, HEADS, 4, dtype=torch.int64)
    for b in range(BATCH):
        for h in range(HEADS):
            head = b * STRIDE_B + h * STRIDE_H
            want[b, h] = torch.tensor([
                head,
                head + FIRST_ROW * STRIDE_L_HF,
                ((b * HEADS + h) * SEQ_LEN + FIRST_ROW) * HEAD_DIM,
                FIRST_PASSAGE * 1024,
            ])
    assert want.max() > 2**32  # the case is really past 2^31
    assert torch.equal(out, want)
    # the same arithmetic in int32 wraps: without the helpers the kernels would address the wrong memory
    assert not torch.equal(wrapped, want[..., 0])


def test_grid_keeps_batch_and_heads_on_separate_axes(monkeypatch):
    """A batch of 70000 rows x 1 head would have been one grid axis of 70000 (> 65535) programs; now it is
    the z axis, and its limit is checked before launch with a clear error."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launches.append((self.name, grid))
            return lambda *args, **kwargs: None

    for name in ("_session_attn_fwd", "_session_attn_bwd_dkdv", "_session_attn_bwd_dq"):
        monkeypatch.setattr(sa, name, Recorder(name))
    layout = SessionLayout.from_segments([[(5, 2, 3)]] * 3, seq_len=12)
    q = torch.randn(3, 4, 12, 16)
    k = torch.randn(3, 2, 12, 16)
    configs = sa.default_configs(16, torch.float32)
    out, lse = sa._forward(q, k, k, layout, 0.25, configs["fwd"])
    sa._backward(q, k, k, out, lse, torch.randn_like(q), layout, 0.25, configs["dkdv"], configs["dq"])
    grids = dict(launches)
    assert grids["_session_attn_fwd"] == (triton.cdiv(12, configs["fwd"][0]), 4, 3)
    assert grids["_session_attn_bwd_dkdv"] == (triton.cdiv(12, configs["dkdv"][1]), 2, 3)
    assert grids["_session_attn_bwd_dq"] == (triton.cdiv(12, configs["dq"][0]), 4, 3)
    with pytest.raises(ValueError, match="65535"):
        sa._check_grid(70000, 1)
