"""Triton session attention against the float64 dense-mask oracle (forward and dq, dk, dv).

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py) in fp32 and fp16.
Tolerances, |got - want| <= tol * (1 + |want|) elementwise, per device and dtype:
- interpreter, fp32 (exact fp32 products): 2e-4;
- GPU, fp32 (the kernels ask for TF32 products, about 1e-3 relative error): 1e-2;
- fp16 (fp16 operands, fp32 accumulation), interpreter or GPU: 1e-2.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import convret
from convret import SessionLayout
from convret.ops.session_attention import reference_attention
from convret.kernels.session_attention import default_configs, session_attention_triton
from conftest import triton_device
from layout_strategies import layouts

# the bounds the backend registers with convret._dispatch (per device: TF32 on a GPU)
TOLERANCES = {dtype: convret._dispatch.get("session_attention", "triton").tolerance(dtype, triton_device())
              for dtype in (torch.float32, torch.float16)}
# small tiles so that skipped, full and partial tiles all occur at the short lengths the interpreter affords
SMALL_TILES = [
    {"fwd": (16, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)},
    {"fwd": (32, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 32, 4, 1)},
]


def make_qkv(layout, q_heads, kv_heads, head_dim, dtype, generator, hf_strides=False):
    batch, seq_len = layout.batch_size, layout.seq_len
    device = triton_device()

    def draw(heads):
        if hf_strides:  # Hugging Face hands over [B, L, H, D] storage transposed to [B, H, L, D]
            t = torch.randn(batch, seq_len, heads, head_dim, generator=generator).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, seq_len, head_dim, generator=generator)
        return t.to(device=device, dtype=dtype).requires_grad_()

    return draw(q_heads), draw(kv_heads), draw(kv_heads)


def oracle(q, k, v, layout, grad_out, scale, window=None):
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, layout.to("cpu"), scale, window)
    out.backward(grad_out.detach().cpu().double())
    return out, q64.grad, k64.grad, v64.grad


def assert_close(name, got, want, dtype):
    tol = TOLERANCES[dtype]
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs() - tol * want.abs()
    assert err.max() <= tol, f"{name}: max violation {err.max().item():.3g} (tol {tol})"


def run_and_compare(layout, q_heads, kv_heads, head_dim, dtype, configs, seed, hf_strides=False, window=None):
    generator = torch.Generator().manual_seed(seed)
    layout = layout.to(triton_device())
    q, k, v = make_qkv(layout, q_heads, kv_heads, head_dim, dtype, generator, hf_strides)
    scale = head_dim**-0.5
    out = session_attention_triton(q, k, v, layout, scale, configs, window=window)
    grad_out = torch.randn(out.shape, generator=generator).to(out)
    out.backward(grad_out)
    want = oracle(q, k, v, layout, grad_out, scale, window)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), want):
        assert_close(name, got, ref, dtype)
    return out, q, k, v


@given(
    layout=layouts(),
    gqa=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    configs=st.sampled_from(SMALL_TILES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_oracle_on_random_layouts(layout, gqa, dtype, configs, seed):
    q_heads, kv_heads = gqa
    run_and_compare(layout, q_heads, kv_heads, 32, dtype, configs, seed)


@settings(max_examples=8)
@given(
    layout=layouts(max_rows=2, max_samples=3, max_padding=6),
    window=st.integers(1, 40),
    gqa=st.sampled_from([(2, 2), (4, 1)]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    configs=st.sampled_from(SMALL_TILES),
    seed=st.integers(0, 2**31 - 1),
)
def test_sliding_windows_match_float64_oracle(layout, window, gqa, dtype, configs, seed):
    """A sliding window (query q sees key j only if q - j < window) beside the layout's mask, forward and
    backward, windows shorter and longer than the samples and the tiles."""
    q_heads, kv_heads = gqa
    run_and_compare(layout, q_heads, kv_heads, 32, dtype, configs, seed, window=window)


def test_tiles_behind_a_sliding_window_are_never_read():
    """One 96-token sample, window 10, 16 x 16 tiles: with NaN in the keys and values of positions 0..15, every
    output row, dq row and key gradient from 32 on is finite and exact: no program of the forward, dk / dv or dq
    kernel loads a key tile behind its query tile's window (the loops start at the first tile in reach)."""
    layout = SessionLayout.from_segments([[(96, 0, 0)]], seq_len=96).to(triton_device())
    generator = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(layout, 2, 1, 32, torch.float32, generator)
    grad_out = torch.randn(q.shape, generator=generator).to(q)
    want = oracle(q, k, v, layout, grad_out, 32**-0.5, window=10)
    with torch.no_grad():
        k[:, :, :16], v[:, :, :16] = float("nan"), float("nan")
    out = session_attention_triton(q, k, v, layout, 32**-0.5, SMALL_TILES[0], window=10)
    out.backward(grad_out)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), want):
        assert_close(name, got[:, :, 32:], ref[:, :, 32:], torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims_64_and_128_with_hugging_face_strides(head_dim):
    layout = SessionLayout.from_segments([[(20, 3, 9), (6, 1, 0)], [(12, 2, 1)]], seq_len=45)
    run_and_compare(layout, 4, 2, head_dim, torch.float16, SMALL_TILES[0], seed=head_dim, hf_strides=True)


def test_public_api_with_default_tiles():
    layout = SessionLayout.from_segments([[(40, 3, 30), (20, 3, 0)], [(70, 2, 0)]], seq_len=100)
    generator = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(layout.to(triton_device()), 4, 1, 32, torch.float32, generator)
    out = convret.session_attention(q, k, v, layout, backend="triton")
    want = reference_attention(q.detach().double(), k.detach().double(), v.detach().double(), layout, 32**-0.5)
    assert_close("out", out, want, torch.float32)
    assert default_configs(32, torch.float32)["fwd"][0] <= 128


def test_padding_rows_are_zero_with_zero_gradient_and_skipped_tiles_are_never_read():
    layout = SessionLayout.from_segments([[(10, 2, 5)], [(30, 0, 0)]], seq_len=64)
    generator = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(layout, 2, 1, 32, torch.float32, generator)
    with torch.no_grad():  # keys 32..63 of row 0 are padding: their key tiles (width 16) are skipped everywhere
        k[0, :, 32:] = float("nan")
        v[0, :, 32:] = float("nan")
    out = session_attention_triton(q, k, v, layout, 32**-0.5, SMALL_TILES[0])
    out.backward(torch.randn(out.shape, generator=generator))
    assert torch.isfinite(out).all()
    assert (out[0, :, 17:] == 0).all() and (out[1, :, 30:] == 0).all()
    assert (q.grad[0, :, 17:] == 0).all() and torch.isfinite(q.grad).all()
    assert (k.grad[1, :, 30:] == 0).all() and (v.grad[1, :, 30:] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "the Triton interpreter runs the programs one after another in a fixed order, so it cannot show run-to-run "
    "differences; tests/test_cpu_determinism.py checks the native CPU backend across thread counts"))
def test_deterministic_backward():
    """On a GPU the programs of a launch run in varying order: no atomics, so the gradients are bitwise equal."""
    layout = SessionLayout.from_segments([[(25, 3, 12)], [(9, 1, 3), (20, 2, 0)]], seq_len=40)
    grads = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(11)
        q, k, v = make_qkv(layout, 4, 1, 32, torch.float32, generator)
        out = session_attention_triton(q, k, v, layout, 32**-0.5, SMALL_TILES[1])
        out.backward(torch.randn(out.shape, generator=generator))
        grads.append((q.grad, k.grad, v.grad))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


# Every head dim of FlashAttention-2's set runs, padded to the next power of two (at least 16) with masked
# loads and stores: 8 and 16 (tiny test models), 80 (Phi-2), 96 (Phi-3-mini), 256 (Gemma). Small layouts keep
# the interpreter fast; the default configs of each head dim range are what the GPU runs.
@pytest.mark.parametrize("head_dim", [8, 16, 80, 96, 256])
@settings(max_examples=3)
@given(
    layout=layouts(max_rows=2, max_samples=2, max_padding=4, max_prefix=10, max_response=6),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_head_dim_matches_float64_oracle(head_dim, layout, dtype, seed):
    run_and_compare(layout, 4, 2, head_dim, dtype, SMALL_TILES[seed % 2], seed, hf_strides=bool(seed % 3 == 0))


@pytest.mark.parametrize("head_dim", [8, 80, 256])
def test_every_head_dim_with_default_configs(head_dim):
    layout = SessionLayout.from_segments([[(30, 3, 9), (6, 1, 0)], [(12, 2, 1)]], seq_len=50)
    run_and_compare(layout, 2, 1, head_dim, torch.float32, None, seed=head_dim)
