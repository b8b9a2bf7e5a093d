"""cached_session_attention (query rows at key positions: a cached prefill) against the float64 oracles.

The dense reference is itself checked against ``reference_attention`` (the session-attention oracle) on the
rows it computes; the sdpa, native cpu and Triton (interpreter on CPU) backends against the float64 reference:
|got - want| <= tol * (1 + |want|) with the tolerances the backends register (cpu: fp32 1e-5, observed about
1e-6; bf16 4e-2, observed about 4e-3: probabilities are rounded to bf16 before the P @ V GEMM; fp16 1e-2).
"""
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convret
from convret import SessionLayout, _dispatch
from convret.ops.session_attention import reference_attention
from convret.ops.session_attention.cached import (CachedPrefill, cached_session_attention, dense_cached_mask,
                                      reference_cached_attention)
from convret.ops.session_attention import cpu as cpu_backend
from convret.ops.session_attention.cpu import TileSizes, cached_session_attention_native, native_available
from conftest import triton_device

OP = "cached_session_attention"
requires_native = pytest.mark.skipif(not native_available(), reason="native extension not built")


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


# ------------------------------------------------------------------------------------- backend="cpu"
def serving_case(seed: int, batch: int, samples: int, max_len: int = 60, full_rate: float = 0.2):
    """Rows packing ``samples`` conversations each (some CSIT samples with a summary and responses), per sample
    the query rows of one kind: its new-token tail (a cached prefill), all of it (a full encode), only its last
    tokens (summary tokens / response rows), or none (the sample is only keys); then padding rows (position
    Lk) and, in some rows, padding positions of the layout. Returns (layout, query_positions)."""
    rng = random.Random(seed)
    rows, per_row = [], []
    for _ in range(batch):
        row, pos, start = [], [], 0
        for _ in range(rng.randint(1, samples)):
            if rng.random() < 0.3:
                sample = (rng.randint(1, max_len // 2), rng.randint(1, 4), rng.randint(1, 12))
            else:
                sample = (rng.randint(1, max_len), rng.randint(0, 3), 0)
            length = sum(sample)
            kind = rng.random()
            if kind < full_rate:
                n = length
            elif kind < 0.85:
                n = rng.randint(1, length)
            elif kind < 0.95:
                n = min(length, sample[1] + sample[2] or 1)
            else:
                n = 0
            row.append(sample)
            pos += range(start + length - n, start + length)
            start += length
        rows.append(row)
        per_row.append(pos)
    seq_len = max(sum(map(sum, row)) for row in rows) + rng.randint(0, 9)
    layout = SessionLayout.from_segments(rows, seq_len)
    q_len = max(1, max(len(p) for p in per_row)) + rng.randint(0, 5)
    positions = torch.full((batch, q_len), seq_len, dtype=torch.long)
    for b, pos in enumerate(per_row):
        positions[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        if rng.random() < 0.3 and len(pos) < q_len and sum(map(sum, rows[b])) < seq_len:
            positions[b, len(pos)] = seq_len - 1  # a padding position of the layout: sees nothing either
    return layout, positions


def check_cpu(layout, positions, q_heads, kv_heads, head_dim, dtype, tiles=None, seed=0, scale=None, window=None):
    q, k, v = qkv(layout, positions, q_heads, kv_heads, head_dim, dtype, seed=seed)
    scale = head_dim ** -0.5 if scale is None else scale
    if tiles is None:
        got = cached_session_attention(q, k, v, layout, positions, scale, backend="cpu", window=window)
    else:
        got = cached_session_attention_native(q, k, v, layout, positions, scale, tiles, window=window)
    assert got.dtype == dtype and got.shape == q.shape
    got = got.double()
    want = reference_cached_attention(q.double(), k.double(), v.double(), layout, positions, scale, window)
    tol = _dispatch.get(OP, "cpu").tolerance(dtype)
    err = (got - want).abs()
    assert bool((err <= tol * (1 + want.abs())).all()), (dtype, float(err.max()))
    sees_nothing = ~dense_cached_mask(layout, positions).any(-1)  # [B, Lq]: padding rows
    assert bool((got.permute(0, 2, 1, 3)[sees_nothing] == 0).all())
    return got


SMALL_CACHED_TILES = [TileSizes(4, 8, 4, 8), TileSizes(5, 16, 4, 8), TileSizes(16, 7, 4, 8), TileSizes(8, 32, 4, 8)]


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), group=st.sampled_from([1, 2, 4]), kv_heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([32, 64, 128]), tiles=st.sampled_from(SMALL_CACHED_TILES + [None]),
       full_rate=st.sampled_from([0.0, 0.2, 1.0]))
def test_cpu_backend_random_packed_rows(dtype, seed, group, kv_heads, head_dim, tiles, full_rate):
    """Several conversations per row, each a new-token tail, a full encode, summary / response rows or none;
    padding query rows; GQA 1 / 2 / 4; small tiles (every tile class, query tiles cut inside a sample, odd
    key tiles that keep the bf16 packed path off) and the default ones."""
    layout, positions = serving_case(seed, batch=2, samples=4, full_rate=full_rate)
    check_cpu(layout, positions, group * kv_heads, kv_heads, head_dim, dtype, tiles, seed)


# ------------------------------------------------------------------------------------ sliding windows
@pytest.mark.parametrize("window", [1, 6, 25])
def test_window_reference_equals_session_oracle_on_its_rows(window):
    layout, positions = random_case(window)
    q, k, v = qkv(layout, positions, 4, 2, 16, torch.float64, seed=window)
    got = reference_cached_attention(q, k, v, layout, positions, 0.3, window)
    full_q = torch.zeros(q.shape[0], q.shape[1], layout.seq_len + 1, q.shape[3], dtype=q.dtype)
    full_q.scatter_(2, positions.clamp(max=layout.seq_len).view(q.shape[0], 1, -1, 1).expand_as(q), q)
    want = reference_attention(full_q[:, :, : layout.seq_len], k, v, layout, 0.3, window)
    for b in range(q.shape[0]):
        real = positions[b] < layout.seq_len
        torch.testing.assert_close(got[b][:, real], want[b][:, positions[b][real]], atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_sdpa_backend(seed, dtype):
    layout, positions = random_case(seed)
    window = (3, 9, 30)[seed]
    q, k, v = qkv(layout, positions, 4, 2, 16, dtype, seed=seed)
    got = cached_session_attention(q, k, v, layout, positions, backend="sdpa", window=window).double()
    want = reference_cached_attention(q.double(), k.double(), v.double(), layout, positions, 16 ** -0.5, window)
    tol = _dispatch.get(OP, "sdpa").tolerance(dtype)
    assert bool(((got - want).abs() <= tol * (1 + want.abs())).all()), float((got - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_triton_backend(dtype):
    from convret.kernels.session_attention import cached_session_attention_triton

    device = triton_device()
    layout, positions = random_case(11, batch=2)
    q, k, v = qkv(layout, positions, 4, 2, 16, dtype, device=device, seed=11)
    tol = _dispatch.get(OP, "triton").tolerance(dtype, device)
    for window in (2, 13):
        want = reference_cached_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout, positions,
                                          0.25, window)
        got = cached_session_attention_triton(q, k, v, layout.to(device), positions.to(device), 0.25,
                                              (16, 16, 4, 1), window=window).double().cpu()
        assert bool(((got - want).abs() <= tol * (1 + want.abs())).all()), float((got - want).abs().max())


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), window=st.integers(1, 40), group=st.sampled_from([1, 4]),
       tiles=st.sampled_from(SMALL_CACHED_TILES + [None]))
def test_window_cpu_backend_random_packed_rows(dtype, seed, window, group, tiles):
    """The native cached prefill with a sliding window: query tiles cut at samples and where the window moves
    the first visible key past the tile's positions, key tiles behind the window skipped."""
    layout, positions = serving_case(seed, batch=2, samples=4)
    check_cpu(layout, positions, 2 * group, 2, 64, dtype, tiles, seed, window=window)


@requires_native
@pytest.mark.parametrize("group", [1, 2, 4])
def test_cpu_backend_serving_row(group):
    """One row packing 12 conversations of 40-120 cached + 5-30 new tokens each, default tiles, D = 64: Lq is
    no multiple of the tile height and the query tiles are cut at every conversation."""
    rng = random.Random(group)
    samples, pos, start = [], [], 0
    for _ in range(12):
        cached, new = rng.randint(40, 120), rng.randint(5, 30)
        samples.append((cached + new, 0, 0))
        pos += range(start + cached, start + cached + new)
        start += cached + new
    layout = SessionLayout.from_segments([samples], start + 3)
    positions = torch.tensor([pos + [start + 3] * 2])
    check_cpu(layout, positions, 2 * group, 2, 64, torch.float32)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_backend_full_positions_equal_session_attention(dtype):
    """query_positions = arange(Lk) on a layout with responses and row padding: the native session-attention
    forward's result."""
    layout = SessionLayout.from_segments([[(50, 3, 17), (20, 0, 0)], [(9, 2, 1), (61, 0, 0)]], 93)
    positions = torch.arange(layout.seq_len).expand(layout.batch_size, -1)
    got = check_cpu(layout, positions, 8, 2, 128, dtype)
    q, k, v = qkv(layout, positions, 8, 2, 128, dtype)
    want = convret.session_attention(q, k, v, layout, backend="cpu").double()
    tol = _dispatch.get(OP, "cpu").tolerance(dtype)
    assert float((got - want).abs().max()) <= tol


@requires_native
def test_cpu_backend_strided_inputs_as_the_model_passes_them():
    """q as Hugging Face's transposed [B, Lq, H, D] projection, k / v the first Lk keys of a longer buffer (as
    CachedPrefill.keys_values returns them): the kernel reads them in place and matches the contiguous run."""
    layout, positions = serving_case(5, batch=2, samples=3)
    q, k, v = qkv(layout, positions, 4, 2, 32, torch.float32, seed=5)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_buf = torch.cat([k, torch.randn_like(k[:, :, :1])], dim=2)
    v_buf = torch.cat([v, torch.randn_like(v[:, :, :1])], dim=2)
    got = cached_session_attention(q_t, k_buf[:, :, :-1], v_buf[:, :, :-1], layout, positions, backend="cpu")
    want = cached_session_attention(q, k, v, layout, positions, backend="cpu")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@requires_native
def test_cpu_backend_bf16_packed_path():
    """The bf16 packed (VNNI brgemm) path, forced, where the CPU runs it: key spans narrowed to odd starts,
    odd Lk (the zero padding key); fresh random cases (forcing and resetting the tile GEMM re-runs its probe,
    so the cases share one forcing)."""
    report = cpu_backend.tile_gemm_info()["bf16"]
    if re.search(r"packed \d", report) is None:
        pytest.skip(f"the packed path cannot run on this CPU: {report}")
    seed = random.randrange(2**16)
    try:
        assert cpu_backend.set_tile_gemm(torch.bfloat16, "packed").startswith("packed (forced)")
        for i in range(8):
            layout, positions = serving_case(seed + i, batch=2, samples=4)
            group = (1, 4)[i % 2]
            try:
                check_cpu(layout, positions, 2 * group, 2, 64, torch.bfloat16, TileSizes(8, 16, 4, 8), seed + i)
            except AssertionError as error:
                raise AssertionError(f"serving_case({seed + i}, batch=2, samples=4), G = {group}: {error}") from error
    finally:
        cpu_backend.set_tile_gemm(torch.bfloat16, "auto")


@requires_native
def test_cpu_backend_is_forward_only_and_float64_takes_sdpa():
    layout, positions = serving_case(1, batch=1, samples=2)
    q, k, v = qkv(layout, positions, 2, 1, 32, torch.float32)
    with pytest.raises(RuntimeError, match="forward only"):
        cached_session_attention(q.requires_grad_(), k, v, layout, positions, backend="cpu")
    with torch.no_grad():
        cached_session_attention(q, k, v, layout, positions, backend="cpu")
    check_cpu(layout, positions, 2, 1, 32, torch.float64)


@requires_native
def test_auto_picks_the_native_cpu_backend_unless_forced_off(monkeypatch):
    """On CPU "auto" runs the native kernel (measured faster than the SDPA loop at serving shapes, see
    docs/serve.md); $CONVRET_BACKEND_CACHED_SESSION_ATTENTION=sdpa or $CONVRET_CPU_BACKEND=fallback give the
    SDPA loop, and an explicit backend="cpu" then says why it cannot run."""
    assert _dispatch.resolve(OP, "auto", "cpu").backend == "cpu"
    assert convret.backend_info()["ops"][OP]["auto"] == "cpu"
    assert convret.backend_info()["cached_prefill"].startswith("native")
    monkeypatch.setenv(_dispatch.env_variable(OP), "sdpa")
    assert _dispatch.resolve(OP, "auto", "cpu").backend == "sdpa"
    monkeypatch.delenv(_dispatch.env_variable(OP))
    monkeypatch.setenv("CONVRET_CPU_BACKEND", "fallback")
    assert _dispatch.resolve(OP, "auto", "cpu").backend == "sdpa"
    assert convret.backend_info()["cached_prefill"].startswith("sdpa")
    with pytest.raises(ValueError, match="CONVRET_CPU_BACKEND=fallback"):
        _dispatch.resolve(OP, "cpu", "cpu")


def test_cpu_backend_without_the_native_build(monkeypatch):
    """An install without the native build: "auto" serves the SDPA loop, backend="cpu" raises with the reason."""
    missing = cpu_backend._NativeState(directory="/nonexistent")
    monkeypatch.setattr(cpu_backend, "_native", missing)
    assert _dispatch.resolve(OP, "auto", "cpu").backend == "sdpa"
    with pytest.raises(ValueError, match="native extension not built"):
        _dispatch.resolve(OP, "cpu", "cpu")
