"""Session attention, forward and forward + backward, every available backend against the dense-mask peers.

One group per (pass, shape, dtype, device); in each, the peers run first, then convret (the in-run speed-up of
micro_common.MicroRun needs that order):

- peer ``eager-dense``: Hugging Face's eager path with the additive float mask (``convret.baselines``);
- peer ``sdpa-dense``: ``scaled_dot_product_attention`` with the dense bool mask;
- ``reference``: convret's dense oracle, at the small shape only (O(L^2) memory, not a fast path);
- ``cpu``: the native CPU backend on CPU tensors;
- ``triton``: the Triton kernels on CUDA tensors (skipped without CUDA: the CPU interpreter is far too slow to
  time).

The masks the peers need are built outside the timed region (a model builds them once per step for all its
layers); their construction is timed on its own in test_micro_layout.py. "fwd" runs under ``torch.no_grad()``
(encoding); "fwdbwd" is one forward and ``torch.autograd.grad`` of q, k, v (training).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import convret
from convret.baselines import additive_mask, dense_mask_eager_attention, sdpa_dense_mask_attention
from micro_common import CSIT_ATTENTION, DTYPES, SMALL_ATTENTION, MicroRun, attention_flops, pick, synchronized

PEERS = ("eager-dense", "sdpa-dense")
TRITON_SKIP = "backend='triton' is timed on CUDA only (no CUDA here; the CPU interpreter is far too slow to time)"


def _cases() -> list:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = []
    for device in devices:
        for passes in ("fwd", "fwdbwd"):
            for shape in ("small", "csit"):
                for dtype in DTYPES:
                    impls = list(PEERS)
                    if shape == "small":
                        impls.append("reference")
                    impls.append("cpu" if device == "cpu" else "triton")
                    for impl in impls:
                        cases.append(pytest.param(passes, shape, dtype, device, impl,
                                                  id=f"{passes}-{shape}-{dtype}-{device}-{impl}"))
    if "cuda" not in devices:
        cases.append(pytest.param("fwd", "small", "fp32", "cuda", "triton", id="triton-needs-cuda",
                                  marks=pytest.mark.skip(reason=TRITON_SKIP)))
    return cases


def _attention_fn(impl: str, q, k, v, layout: convret.SessionLayout, scale: float) -> Callable[[], torch.Tensor]:
    if impl == "eager-dense":
        mask = additive_mask(layout, q.dtype)
        return lambda: dense_mask_eager_attention(q, k, v, mask, scale)
    if impl == "sdpa-dense":
        allowed = layout.dense_mask().unsqueeze(1)
        return lambda: sdpa_dense_mask_attention(q, k, v, allowed, scale)
    return lambda: convret.session_attention(q, k, v, layout, scale=scale, backend=impl)


@pytest.mark.parametrize("passes, shape_name, dtype_name, device_name, impl", _cases())
def test_session_attention(benchmark, micro: MicroRun, passes: str, shape_name: str, dtype_name: str,
                           device_name: str, impl: str) -> None:
    shape = pick(shape_name, micro.smoke, CSIT_ATTENTION, SMALL_ATTENTION)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    if impl not in PEERS and impl not in convret.available_backends():
        pytest.fail(f"backend {impl!r} is not registered; available: {convret.available_backends()}")
    layout = shape.layout(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    backward = passes == "fwdbwd"
    q = randn(shape.batch, shape.q_heads, shape.seq_len, shape.head_dim).requires_grad_(backward)
    k = randn(shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim).requires_grad_(backward)
    v = randn(shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim).requires_grad_(backward)
    attend = _attention_fn(impl, q, k, v, layout, shape.head_dim**-0.5)

    if backward:
        grad_out = randn(shape.batch, shape.q_heads, shape.seq_len, shape.head_dim)

        def step():
            return torch.autograd.grad(attend(), (q, k, v), grad_out)
    else:
        def step():
            with torch.no_grad():
                return attend()

    benchmark.group = f"attention {passes} {shape_name} {dtype_name} {device_name}"
    result = benchmark(synchronized(step, device))
    outputs = result if backward else (result,)
    assert all(bool(torch.isfinite(t).all()) for t in outputs), f"{impl}: non-finite output or gradient"
    micro.record(benchmark, impl, "peer" if impl in PEERS else "convret", shape.describe(), dtype=dtype_name,
                 flops=attention_flops(layout, shape.q_heads, shape.head_dim, backward), device=device,
                 gemm_dtype=dtype)
