"""The native CPU session attention is deterministic: bitwise the same results at any thread count and on
every run (docs/cpu_backend.md promises it: each work item owns its outputs, no atomics, no thread-dependent
reduction). Unlike a determinism test under the sequential Triton interpreter, this one can fail: a split of
the work whose partial sums depend on the thread schedule changes the low bits."""
from __future__ import annotations

import pytest
import torch

from convret import SessionLayout
from convret.ops.session_attention.cpu import TileSizes, native_available, session_attention_cpu

pytestmark = pytest.mark.skipif(not native_available(), reason="native extension not built")


def run(threads: int, dtype: torch.dtype, tiles: TileSizes | None):
    layout = SessionLayout.from_segments([[(70, 3, 40), (20, 2, 0)], [(150, 0, 0)], [(9, 1, 5)]], seq_len=160)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(5)
        q = torch.randn(3, 4, 160, 64, generator=generator).to(dtype).requires_grad_()
        k, v = (torch.randn(3, 2, 160, 64, generator=generator).to(dtype).requires_grad_() for _ in range(2))
        out = session_attention_cpu(q, k, v, layout, implementation="native", tile_sizes=tiles)
        out.backward(torch.randn(out.shape, generator=generator).to(dtype))
        return [t.detach().clone() for t in (out, q.grad, k.grad, v.grad)]
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [None, TileSizes(8, 16, 16, 8)], ids=["default", "small"])
def test_native_backend_is_bitwise_deterministic_across_threads(dtype, tiles):
    one = run(1, dtype, tiles)
    for threads in (2, 2, 3):  # 3 threads on 2 cores: another split and schedule again
        again = run(threads, dtype, tiles)
        for name, a, b in zip(("out", "dq", "dk", "dv"), one, again):
            assert torch.equal(a, b), f"{name} differs between 1 and {threads} threads ({dtype})"
    assert one[1].abs().sum() > 0 and one[2].abs().sum() > 0  # gradients that can differ
