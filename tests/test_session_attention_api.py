"""session_attention's contract: dispatch, defaults and one clear error per kind of bad input."""
import pytest
import torch

import convret
from convret import SessionLayout, session_attention
from convret.ops.session_attention import reference_attention, resolve_backend


def qkv(batch=1, q_heads=4, kv_heads=2, seq_len=12, head_dim=32, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_len, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator, dtype=dtype)
    return q, k, v


LAYOUT = SessionLayout.from_segments([[(5, 2, 3)]], seq_len=12)


def test_reference_matches_textbook_attention_in_float64():
    q, k, v = (t.double().requires_grad_() for t in qkv())
    out = session_attention(q, k, v, LAYOUT, backend="reference")
    mask = LAYOUT.dense_mask()[:, None]
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k_rep.transpose(-1, -2)) / 32**0.5
    rows = []
    for i in range(12):
        visible = mask[..., i, :]
        if visible.any():
            weights = torch.softmax(scores[..., i, :].masked_fill(~visible, float("-inf")), -1)
            rows.append(torch.einsum("bhj,bhjd->bhd", weights, v_rep))
        else:
            rows.append(torch.zeros_like(q[..., 0, :]))
    want = torch.stack(rows, dim=2)
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.equal(out[:, :, 10:], torch.zeros_like(out[:, :, 10:]))  # padding rows
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 10:] == 0).all()


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv()
    default = session_attention(q, k, v, LAYOUT, backend="reference")
    explicit = session_attention(q, k, v, LAYOUT, scale=32**-0.5, backend="reference")
    other = session_attention(q, k, v, LAYOUT, scale=1.0, backend="reference")
    assert torch.equal(default, explicit) and not torch.allclose(default, other)


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) in {"cpu", "reference"}


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        session_attention(q, k, v, LAYOUT, backend="triton")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v: (q[0], k, v, LAYOUT), "4-D"),
        (lambda q, k, v: (q, k, v[:, :1], LAYOUT), "same shape"),
        (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10], LAYOUT), "does not match"),
        (lambda q, k, v: (q[:, :3], k, v, LAYOUT), "multiple of Hkv"),
        (lambda q, k, v: (q, k, v, SessionLayout.from_segments([[(5, 2, 3)]], seq_len=11)), "layout shape"),
        (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12], LAYOUT), "head dim 12: .*multiples of 8"),
        (lambda q, k, v: (*(torch.randn(1, h, 12, 264) for h in (4, 2, 2)), LAYOUT), "head dim 264: .*up to 256"),
        (lambda q, k, v: (q, k.to("meta"), v, LAYOUT), "mixed devices"),
        (lambda q, k, v: (q, k.double(), v, LAYOUT), "mixed dtypes"),
        (lambda q, k, v: (q.long(), k.long(), v.long(), LAYOUT), "floating point"),
    ],
)
def test_bad_inputs_raise_a_clear_error(make, match):
    args = make(*qkv())
    with pytest.raises(ValueError, match=match):
        session_attention(*args)


def test_sliding_window_argument():
    """The window is checked; one that hides nothing (no sample longer than it) reaches the backend as None, so that
    the window-free kernels run; a shorter one changes the result to the banded oracle's."""
    from convret.ops.session_attention import effective_window

    q, k, v = qkv()
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="window must be None or a positive number of keys"):
            session_attention(q, k, v, LAYOUT, window=bad)
    assert LAYOUT.max_attention_span() == 6  # the last session token sees the first
    assert effective_window(7, LAYOUT) is None and effective_window(6, LAYOUT) == 6
    assert torch.equal(session_attention(q, k, v, LAYOUT, window=7), session_attention(q, k, v, LAYOUT))
    banded = session_attention(q.double(), k.double(), v.double(), LAYOUT, backend="reference", window=3)
    torch.testing.assert_close(session_attention(q, k, v, LAYOUT, window=3).double(), banded, atol=1e-5, rtol=0)
    assert not torch.allclose(banded, session_attention(q.double(), k.double(), v.double(), LAYOUT,
                                                        backend="reference"))


def test_bad_layout_type_and_backend_name():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="SessionLayout"):
        session_attention(q, k, v, LAYOUT.dense_mask())
    with pytest.raises(ValueError, match="unknown backend"):
        session_attention(q, k, v, LAYOUT, backend="flash")


def test_public_names():
    assert {"SessionLayout", "session_attention"} <= set(convret.__all__)
    assert {"reference", "triton"} <= set(convret.available_backends())
    assert reference_attention is not None
