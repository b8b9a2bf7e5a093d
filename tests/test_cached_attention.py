"""cached_session_attention (query rows at key positions: a cached prefill) against the float64 oracles.

The dense reference is itself checked against ``reference_attention`` (the session-attention oracle) on the
rows it computes; the sdpa and Triton (interpreter on CPU) backends against the float64 reference:
|got - want| <= tol * (1 + |want|) with the tolerances the backends register.
"""
import random

import pytest
import torch

import convret
from convret import SessionLayout, _dispatch
from convret.ops.session_attention import reference_attention
from convret.ops.session_attention.cached import (CachedPrefill, cached_session_attention, dense_cached_mask,
                                      reference_cached_attention)
from conftest import triton_device


def random_case(seed: int, batch: int = 3, max_samples: int = 3, responses: bool = True):
    """A packed layout and, per row, query positions: for each sample a random tail of it (a cached prefill;
    sometimes the whole sample, sometimes only its last token), in order, then padding (position L)."""
    rng = random.Random(seed)
    rows, tails = [], []
    for _ in range(batch):
        row, tail = [], []
        for _ in range(rng.randint(1, max_samples)):
            if responses and rng.random() < 0.3:
                sample = (rng.randint(1, 20), rng.randint(1, 3), rng.randint(1, 10))
            else:
                sample = (rng.randint(1, 40), 0, 0)
            row.append(sample)
            tail.append(rng.choice([sum(sample), 1, rng.randint(1, sum(sample))]))
        rows.append(row)
        tails.append(tail)
    seq_len = max(sum(map(sum, row)) for row in rows) + rng.randint(0, 5)
    layout = SessionLayout.from_segments(rows, seq_len)
    per_row = []
    for row, tail in zip(rows, tails):
        start, pos = 0, []
        for sample, n in zip(row, tail):
            end = start + sum(sample)
            pos += list(range(end - n, end))
            start = end
        per_row.append(pos)
    q_len = max(len(p) for p in per_row) + rng.randint(0, 3)
    positions = torch.full((batch, q_len), seq_len, dtype=torch.long)
    for b, pos in enumerate(per_row):
        positions[b, : len(pos)] = torch.tensor(pos)
    return layout, positions


def qkv(layout, positions, q_heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, q_len = positions.shape
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, layout.seq_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, layout.seq_len, head_dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


@pytest.mark.parametrize("seed", range(4))
def test_reference_equals_session_oracle_on_its_rows(seed):
    layout, positions = random_case(seed)
    q, k, v = qkv(layout, positions, 4, 2, 16, torch.float64, seed=seed)
    got = reference_cached_attention(q, k, v, layout, positions, 0.3)
    # the full attention with every row computed, queries placed at their positions
    full_q = torch.zeros(q.shape[0], q.shape[1], layout.seq_len + 1, q.shape[3], dtype=q.dtype)
    full_q.scatter_(2, positions.clamp(max=layout.seq_len).view(q.shape[0], 1, -1, 1).expand_as(q), q)
    want = reference_attention(full_q[:, :, : layout.seq_len], k, v, layout, 0.3)
    for b in range(q.shape[0]):
        real = positions[b] < layout.seq_len
        torch.testing.assert_close(got[b][:, real], want[b][:, positions[b][real]], atol=1e-12, rtol=0)
        assert bool((got[b][:, ~real] == 0).all())  # padding query rows are zeros


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_backend(seed, dtype):
    layout, positions = random_case(seed)
    q, k, v = qkv(layout, positions, 4, 2, 16, dtype, seed=seed)
    got = cached_session_attention(q, k, v, layout, positions, backend="sdpa").double()
    want = reference_cached_attention(q.double(), k.double(), v.double(), layout, positions, 16 ** -0.5)
    tol = _dispatch.get("cached_session_attention", "sdpa").tolerance(dtype)
    assert bool(((got - want).abs() <= tol * (1 + want.abs())).all()), float((got - want).abs().max())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend(seed, dtype):
    from convret.kernels.session_attention import cached_session_attention_triton

    device = triton_device()
    layout, positions = random_case(seed, batch=2)
    q, k, v = qkv(layout, positions, 4, 2, 16, dtype, device=device, seed=seed)
    want = reference_cached_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout, positions,
                                      0.25)
    tol = _dispatch.get("cached_session_attention", "triton").tolerance(dtype, device)
    # small tiles: several query and key tiles, tiles skipped by the mask
    for config in [(16, 16, 4, 1), None]:
        got = cached_session_attention_triton(q, k, v, layout.to(device), positions.to(device), 0.25,
                                              config).double().cpu()
        assert bool(((got - want).abs() <= tol * (1 + want.abs())).all()), float((got - want).abs().max())


def test_auto_backend_and_full_positions_equal_session_attention():
    layout, _ = random_case(7, responses=True)
    positions = torch.arange(layout.seq_len).expand(layout.batch_size, -1)
    q, k, v = qkv(layout, positions, 4, 4, 8, torch.float32)
    got = cached_session_attention(q, k, v, layout, positions)
    want = convret.session_attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_mask_and_bad_inputs():
    layout = SessionLayout.from_segments([[(3, 0, 0), (2, 0, 0)]], 6)
    mask = dense_cached_mask(layout, torch.tensor([[2, 4, 6]]))
    assert mask.int().tolist() == [[[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]]
    q, k, v = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    with pytest.raises(ValueError, match="query_positions must be an integer"):
        cached_session_attention(q, k, v, layout, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="layout shape"):
        cached_session_attention(q, k[:, :, :5], v[:, :, :5], layout, torch.zeros(1, 3, dtype=torch.long))


def test_cached_prefill_places_keys_and_position_ids():
    layout = SessionLayout.from_segments([[(4, 0, 0), (3, 0, 0)]], 8)
    positions = torch.tensor([[2, 3, 6, 8]])  # sample 1: 2 cached + 2 new, sample 2: 2 cached + 1 new, padding
    cache_a = torch.arange(2 * 2 * 1 * 2 * 8, dtype=torch.float32).view(2, 2, 1, 2, 8)  # [layers, 2, H, n, D]
    cache_b = -cache_a
    prefill = CachedPrefill(layout, positions, [[(0, cache_a), (4, cache_b)]])
    new_k, new_v = torch.ones(1, 1, 4, 8), 2 * torch.ones(1, 1, 4, 8)
    k, v = prefill.keys_values(1, new_k, new_v)
    assert k.shape == (1, 1, 8, 8)
    torch.testing.assert_close(k[0, :, 0:2], cache_a[1, 0])
    torch.testing.assert_close(v[0, :, 4:6], cache_b[1, 1])
    assert bool((k[0, 0, [2, 3, 6]] == 1).all()) and bool((v[0, 0, [2, 3, 6]] == 2).all())
    assert bool((k[0, 0, 7] == 0).all())  # padding key position stays empty
    assert prefill.position_ids()[:, :3].tolist() == [[2, 3, 2]]  # within their samples; padding: any
    assert prefill.new_kv[1][0] is new_k
