"""backend="cpu": parity of the native kernels and of the PyTorch fallback with the float64 oracle.

Tolerances, on max |actual - oracle| relative to max(1, max |oracle|) per tensor (out, dq, dk, dv), with the
oracle run in float64 on the same (already rounded) inputs:
- fp32: 1e-4 (the kernels accumulate in fp32; observed errors are around 1e-6);
- bf16: 4e-2 (probabilities and dS are rounded to bf16 before their GEMMs, as in any bf16 flash kernel;
  observed errors are around 1e-2);
- fp16: 1e-2.
The native kernels run with small tiles here so that skipped, full and partial tiles all occur at small L.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convret
from convret import SessionLayout, session_attention
from convret.ops.session_attention import cpu as _cpu_backend
from convret.ops.session_attention.cpu import (
    TileSizes,
    _NativeState,
    backend_info,
    default_tile_sizes,
    native_available,
    session_attention_cpu,
)
from convret.ops.session_attention import reference_attention

TOLERANCE = {dtype: convret._dispatch.get("session_attention", "cpu").tolerance(dtype)  # registered bounds
             for dtype in (torch.float32, torch.bfloat16, torch.float16)}
SMALL_TILES = [TileSizes(4, 8, 8, 4), TileSizes(8, 8, 4, 8), TileSizes(16, 4, 4, 16), TileSizes(8, 16, 16, 8)]
IMPLEMENTATIONS = [
    pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="native extension not built")),
    "fallback",
]

requires_native = pytest.mark.skipif(not native_available(), reason="native extension not built")


# ------------------------------------------------------------------------------------------- helpers
@st.composite
def layouts(draw) -> SessionLayout:
    """1-3 rows of 1-4 samples: CSIT samples (summary 1-4, responses of 0, 1 or more tokens) beside plain
    causal samples, then 0-5 padding positions."""
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        samples = []
        for _ in range(draw(st.integers(1, 4))):
            if draw(st.booleans()):  # plain causal sample (a passage or session to embed)
                samples.append((draw(st.integers(1, 14)), draw(st.integers(0, 3)), 0))
            else:
                response = draw(st.sampled_from([0, 1, 2, 5, 11]))
                samples.append((draw(st.integers(0, 14)), draw(st.integers(1, 4)), response))
        rows.append(samples)
    used = max(sum(sum(sample) for sample in row) for row in rows)
    return SessionLayout.from_segments(rows, seq_len=used + draw(st.integers(0, 5)))


def make_inputs(layout: SessionLayout, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                memory_layout: str, seed: int):
    """q, k, v with the requested memory layout: contiguous, transposed ([B, L, H, D] storage, as a model's
    projections produce), or a slice of a wider tensor (row stride 2 * D); never zeros."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq_len = layout.batch_size, layout.seq_len

    def make(heads: int) -> torch.Tensor:
        if memory_layout == "transposed":
            t = torch.randn(batch, seq_len, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
        elif memory_layout == "sliced":
            t = torch.randn(batch, heads, seq_len, 2 * head_dim, generator=generator).to(dtype)[..., head_dim:]
        elif memory_layout == "strided_d":  # unit stride broken along D itself
            t = torch.randn(batch, heads, seq_len, 2 * head_dim, generator=generator).to(dtype)[..., ::2]
        else:
            t = torch.randn(batch, heads, seq_len, head_dim, generator=generator).to(dtype)
        return t.requires_grad_()

    return make(q_heads), make(kv_heads), make(kv_heads)


def oracle(q, k, v, layout, grad_out, scale, window=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, layout, scale, window)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return (out.detach(), *grads)


def assert_close_scaled(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual.double() - expected).abs().max().item()
    bound = tolerance * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e}"


def check_parity(layout, q_heads, kv_heads, head_dim, dtype, memory_layout, implementation, tiles, seed=0,
                 window=None):
    q, k, v = make_inputs(layout, q_heads, kv_heads, head_dim, dtype, memory_layout, seed)
    scale = head_dim**-0.5
    out = session_attention_cpu(q, k, v, layout, scale, implementation=implementation, tile_sizes=tiles,
                                window=window)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle(q, k, v, layout, grad_out, scale, window)
    assert out.dtype == dtype and out.shape == q.shape
    if implementation == "native" and memory_layout in ("contiguous", "transposed"):
        # outputs keep the inputs' memory layout: a model's transpose back to [B, L, H, D] is then free
        assert out.stride() == q.stride()
        assert [g.stride() for g in grads] == [t.stride() for t in (q, k, v)]
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_close_scaled(name, actual, want, TOLERANCE[dtype])
    # rows with no visible key (padding) are exact zeros, with zero gradient
    padding_rows = ~layout.dense_mask().any(-1)  # [B, L]
    if padding_rows.any():
        assert (out.detach().permute(0, 2, 1, 3)[padding_rows] == 0).all()
        assert (grads[0].permute(0, 2, 1, 3)[padding_rows] == 0).all()


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts(),
    group=st.sampled_from([1, 2, 4]),
    kv_heads=st.sampled_from([1, 2]),
    memory_layout=st.sampled_from(["contiguous", "transposed", "sliced", "strided_d"]),
    tiles=st.sampled_from(SMALL_TILES),
    seed=st.integers(0, 2**16),
)
def test_parity_random_layouts(implementation, dtype, layout, group, kv_heads, memory_layout, tiles, seed):
    check_parity(layout, group * kv_heads, kv_heads, 32, dtype, memory_layout, implementation, tiles, seed)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("head_dim", [8, 16, 80, 96, 256])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    memory_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    tiles=st.sampled_from(SMALL_TILES + [None]),
    seed=st.integers(0, 2**16),
)
def test_parity_every_head_dim(implementation, head_dim, layout, dtype, memory_layout, tiles, seed):
    """Head dims of real models that are not a multiple of the vector width or of 32: 8 and 16 (tiny test
    models), 80 (Phi-2), 96 (Phi-3-mini), 256 (Gemma)."""
    check_parity(layout, 4, 2, head_dim, dtype, memory_layout, implementation, tiles, seed)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_default_tiles_head_dim_128(implementation, dtype):
    """Default tile sizes, D = 128, GQA 4: a CSIT sample with a long session next to a short one, and a
    partly padded row; L = 301 is not a multiple of any tile size."""
    layout = SessionLayout.from_segments([[(150, 3, 41), (40, 3, 0)], [(60, 2, 1), (90, 0, 0)]], seq_len=301)
    check_parity(layout, 8, 2, 128, dtype, "transposed", implementation, None)


@requires_native
def test_every_tile_class_occurs_and_matches():
    """The fixed layout below has skipped, full and partial tiles for 8 x 8 tiles; the native kernels, run
    with exactly those tiles, match the oracle."""
    layout = SessionLayout.from_segments([[(40, 3, 21), (12, 0, 0)], [(9, 1, 1), (30, 2, 0)]], seq_len=80)
    classes = set(layout.tile_classes(8, 8).flatten().tolist())
    assert classes == {0, 1, 2}
    check_parity(layout, 4, 2, 64, torch.float32, "contiguous", "native", TileSizes(8, 8, 8, 8))


@requires_native
def test_fp16_native():
    layout = SessionLayout.from_segments([[(30, 3, 12), (7, 0, 0)]], seq_len=55)
    check_parity(layout, 4, 1, 64, torch.float16, "contiguous", "native", TileSizes(8, 16, 16, 8))


def test_float64_takes_the_fallback():
    layout = SessionLayout.from_segments([[(20, 3, 6)]], seq_len=30)
    q, k, v = make_inputs(layout, 2, 1, 32, torch.float64, "contiguous", 3)
    out = session_attention_cpu(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, 32**-0.5))


@requires_native
def test_native_matches_fallback_on_a_packed_row():
    layout = SessionLayout.from_segments([[(100, 3, 40)] + [(30, 3, 0)] * 3], seq_len=260)
    q, k, v = make_inputs(layout, 4, 2, 64, torch.float32, "contiguous", 5)
    native = session_attention_cpu(q, k, v, layout, implementation="native")
    fallback = session_attention_cpu(q, k, v, layout, implementation="fallback")
    torch.testing.assert_close(native, fallback, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ dispatch and fallback
def test_auto_picks_cpu_backend_for_cpu_tensors(monkeypatch):
    assert "cpu" in convret.available_backends()
    calls = []
    original = _cpu_backend.session_attention_cpu
    monkeypatch.setattr(_cpu_backend, "session_attention_cpu", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    layout = SessionLayout.from_segments([[(10, 2, 4)]], seq_len=16)
    q, k, v = make_inputs(layout, 2, 2, 32, torch.float32, "contiguous", 0)
    session_attention(q, k, v, layout)
    assert calls == [1]


def test_env_var_forces_the_fallback(monkeypatch):
    monkeypatch.setenv(_cpu_backend.ENV_IMPLEMENTATION, "fallback")
    info = backend_info()
    assert info["implementation"] == "fallback" and "forced" in info["reason"]
    calls = []
    original = _cpu_backend.fallback_session_attention
    monkeypatch.setattr(_cpu_backend, "fallback_session_attention", lambda *a: calls.append(1) or original(*a))
    layout = SessionLayout.from_segments([[(10, 2, 4)], [(5, 0, 0)]], seq_len=16)
    check_parity(layout, 4, 2, 32, torch.float32, "contiguous", "auto", None)
    assert calls == [1]


def test_bad_implementation_name(monkeypatch):
    monkeypatch.setenv(_cpu_backend.ENV_IMPLEMENTATION, "fast")
    with pytest.raises(ValueError, match="CONVRET_CPU_BACKEND"):
        backend_info()


def test_extension_missing_path(monkeypatch, tmp_path):
    """What an install without the native build sees: backend_info explains, "auto" serves the fallback
    with correct results, "native" raises a clear error."""
    missing = _NativeState(str(tmp_path))
    assert not missing.load() and "not built" in missing.reason
    monkeypatch.setattr(_cpu_backend, "_native", missing)
    monkeypatch.delenv(_cpu_backend.ENV_IMPLEMENTATION, raising=False)
    info = convret.backend_info()
    assert info["implementation"] == "fallback" and info["library"] is None and "not built" in info["reason"]
    layout = SessionLayout.from_segments([[(12, 3, 5)], [(4, 1, 1), (6, 0, 0)]], seq_len=21)
    check_parity(layout, 4, 2, 32, torch.bfloat16, "transposed", "auto", None)
    q, k, v = make_inputs(layout, 2, 2, 32, torch.float32, "contiguous", 0)
    with pytest.raises(RuntimeError, match="not available"):
        session_attention_cpu(q, k, v, layout, implementation="native")


def test_broken_library_is_reported(monkeypatch, tmp_path):
    (tmp_path / "_convret_cpu.broken.so").write_bytes(b"not an ELF file")
    broken = _NativeState(str(tmp_path))
    assert not broken.load() and "failed to load" in broken.reason


@requires_native
def test_backend_info_native():
    info = backend_info()
    assert info["implementation"] == "native" and info["library"] and info["blas"]
    assert info["threads"] == torch.get_num_threads()
    assert "backward" in info["work_items"] and set(info["tile_gemm"]) == {"bf16", "fp16"}


def _packed_path_runs(dtype: torch.dtype) -> bool:
    """The probe's report lists a rate for the packed path where it runs (and a reason where it cannot)."""
    report = _cpu_backend.tile_gemm_info()["bf16" if dtype == torch.bfloat16 else "fp16"]
    return re.search(r"packed \d", report) is not None


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tile_gemm", ["mkl", "onednn", "upcast", "packed"])
def test_every_tile_gemm_matches(dtype, tile_gemm):
    """Whatever the probe picks on a given CPU, each 16-bit tile GEMM gives oracle parity (mkl, onednn and upcast
    exist on an x86 torch; the packed path needs oneDNN's bf16 / fp16 ukernel: AVX512-BF16 or AMX for bf16,
    AVX512-FP16 for fp16; one that cannot run here raises, and the probe then never picks it)."""
    layout = SessionLayout.from_segments([[(40, 3, 12), (9, 0, 0)], [(20, 2, 1)]], seq_len=70)
    if tile_gemm == "packed" and not _packed_path_runs(dtype):
        pytest.skip(f"the packed path cannot run on this CPU for {dtype}: {backend_info()['tile_gemm']}")
    try:
        report = _cpu_backend.set_tile_gemm(dtype, tile_gemm)
        assert report.startswith(tile_gemm)
        check_parity(layout, 4, 2, 80, dtype, "transposed", "native", TileSizes(16, 16, 16, 8))
    finally:
        _cpu_backend.set_tile_gemm(dtype, "auto")
    info = backend_info()["tile_gemm"]
    assert set(info) == {"bf16", "fp16"} and all("GFLOP/s" in line for line in info.values())


@requires_native
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), group=st.sampled_from([1, 4]), tiles=st.sampled_from(SMALL_TILES),
       memory_layout=st.sampled_from(["contiguous", "transposed"]), seed=st.integers(0, 2**16))
def test_packed_path_matches_oracle(layout, group, tiles, memory_layout, seed):
    """The packed (VNNI brgemm) path, forced, against the float64 oracle on drawn layouts: narrowed key spans
    that start at odd keys, odd L (the zero padding key), every tile class."""
    if not _packed_path_runs(torch.bfloat16):
        pytest.skip(f"the packed path cannot run on this CPU: {_cpu_backend.tile_gemm_info()['bf16']}")
    try:
        assert _cpu_backend.set_tile_gemm(torch.bfloat16, "packed").startswith("packed (forced)")
        check_parity(layout, 2 * group, 2, 48, torch.bfloat16, memory_layout, "native", tiles, seed)
    finally:
        _cpu_backend.set_tile_gemm(torch.bfloat16, "auto")


@requires_native
def test_probe_never_picks_a_packed_path_that_cannot_run():
    """With oneDNN switched off (torch.backends.mkldnn), the ukernel cannot run: a packed path picked before falls
    back to the per-tile GEMM, the probe reports why, keeps a per-tile GEMM, forcing the packed path raises, and
    the kernels still match the oracle."""
    layout = SessionLayout.from_segments([[(40, 3, 12), (9, 0, 0)], [(20, 2, 1)]], seq_len=70)
    try:
        if _packed_path_runs(torch.bfloat16):  # picked while oneDNN was on, then oneDNN switched off
            _cpu_backend.set_tile_gemm(torch.bfloat16, "packed")
            with torch.backends.mkldnn.flags(enabled=False):
                check_parity(layout, 4, 2, 64, torch.bfloat16, "contiguous", "native", TileSizes(16, 16, 16, 8))
        with torch.backends.mkldnn.flags(enabled=False):
            report = _cpu_backend.set_tile_gemm(torch.bfloat16, "auto")
            assert re.search(r"packed unavailable", report) and not report.startswith("packed"), report
            with pytest.raises(RuntimeError, match="cannot run here"):
                _cpu_backend.set_tile_gemm(torch.bfloat16, "packed")
            check_parity(layout, 4, 2, 64, torch.bfloat16, "contiguous", "native", TileSizes(16, 16, 16, 8))
    finally:
        _cpu_backend.set_tile_gemm(torch.bfloat16, "auto")


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layout=layouts(), group=st.sampled_from([1, 4]), tiles=st.sampled_from(SMALL_TILES), seed=st.integers(0, 2**16))
def test_split_backward_matches_oracle_and_fused(monkeypatch, dtype, layout, group, tiles, seed):
    """The split backward (dK / dV items per key tile, dQ items per query tile) matches the oracle, and the fused
    one bit for bit: both do the same arithmetic per (query tile, key tile) pair in the same order."""
    monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, "split")
    check_parity(layout, 2 * group, 2, 48, dtype, "transposed", "native", tiles, seed)
    grads = {}
    for schedule in ("split", "fused"):
        monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, schedule)
        q, k, v = make_inputs(layout, 2 * group, 2, 48, dtype, "contiguous", seed)
        out = session_attention_cpu(q, k, v, layout, implementation="native", tile_sizes=tiles)
        grads[schedule] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for split, fused in zip(grads["split"], grads["fused"]):
        assert torch.equal(split, fused)


# ------------------------------------------------------------------------------------ sliding windows
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layout=layouts(), window=st.integers(1, 20), group=st.sampled_from([1, 4]), tiles=st.sampled_from(SMALL_TILES),
       memory_layout=st.sampled_from(["contiguous", "transposed"]), schedule=st.sampled_from(["fused", "split"]),
       seed=st.integers(0, 2**16))
def test_parity_with_sliding_windows(monkeypatch, implementation, dtype, layout, window, group, tiles, memory_layout,
                                     schedule, seed):
    """A sliding window (query q sees key j only if q - j < window) beside the layout's mask: forward and both
    backward schedules against the float64 oracle, windows shorter and longer than the samples and the tiles."""
    monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, schedule)
    check_parity(layout, 2 * group, 2, 32, dtype, memory_layout, implementation, tiles, seed, window=window)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_sliding_window_default_tiles_and_tiles_behind_the_window_are_never_read(dtype, monkeypatch):
    """One 300-token sample, window 40, default tiles: parity; then with NaN in the keys and values of the first 64
    positions, every row from 160 on (whose window starts past key 64 + one tile) is still exact, as are the key
    gradients from 160 on: the kernels never load a key tile behind a query tile's window."""
    layout = SessionLayout.from_segments([[(300, 0, 0)], [(120, 3, 60), (80, 0, 0)]], seq_len=301)
    check_parity(layout, 8, 2, 64, dtype, "transposed", "native", None, window=40)
    for schedule in ("fused", "split"):
        monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, schedule)
        q, k, v = make_inputs(layout, 8, 2, 64, dtype, "contiguous", 7)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
        expected = oracle(q, k, v, layout, grad_out, 0.125, window=40)
        with torch.no_grad():
            k[0, :, :64], v[0, :, :64] = float("nan"), float("nan")
        out = session_attention_cpu(q, k, v, layout, 0.125, implementation="native", window=40)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
            assert_close_scaled(name, got[0, :, 160:], want[0, :, 160:], TOLERANCE[dtype])


def test_backward_schedule_and_work_items(monkeypatch):
    monkeypatch.delenv(_cpu_backend.ENV_BACKWARD, raising=False)
    tiles = default_tile_sizes(4)
    # 5 rows x 2 kv heads on a 32-core server: fused would be 10 items; split has more than the forward
    items = _cpu_backend.work_items(5, 2, 1411, tiles, threads=32)
    assert items["backward_schedule"] == "split" and items["backward"] >= items["forward"] > 10
    assert _cpu_backend.work_items(8, 8, 1411, tiles, threads=2)["backward_schedule"] == "fused"
    monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, "fused")
    assert _cpu_backend.backward_schedule(1, 1, threads=64) == "fused"
    monkeypatch.setenv(_cpu_backend.ENV_BACKWARD, "sideways")
    with pytest.raises(ValueError, match="CONVRET_CPU_BACKWARD"):
        _cpu_backend.backward_schedule(1, 1)


def test_default_tile_sizes():
    assert default_tile_sizes(1).fwd_block_m == 64 and default_tile_sizes(4).fwd_block_m == 32
    assert default_tile_sizes(16).bwd_block_m == 16


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI (a fresh install) insists on the native build")
def test_fresh_install_built_the_native_extension():
    assert native_available(), backend_info()["reason"]
