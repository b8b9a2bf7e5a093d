"""Every default config of every Triton kernel compiles for sm_80 (A100) and sm_90 (H100) without a GPU,
and its cubin shows no spills (no stack, no local memory). Same check as ``python -m convret.aot``.

Session attention is compiled here at CI_HEAD_DIMS, one head dim per kind of build (masked columns at BLOCK_D
16 and 128, the common unpadded 128, the largest 256), to keep CI short (about 2.3 s per build on 2 cores);
``python -m convret.aot`` checks the larger AOT_HEAD_DIMS set and ``--all-head-dims`` every multiple of 8.
"""
from convret import aot

CI_HEAD_DIMS = (8, 80, 128, 256)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    usages = list(aot.check_all(head_dims=CI_HEAD_DIMS))
    for head_dim in CI_HEAD_DIMS:
        assert any(usage.name.startswith(f"session_attn_fwd[bf16,d{head_dim},") for usage in usages)
    assert {usage.capability for usage in usages} == set(aot.TARGETS)
    spilling = [f"{u.name} sm_{u.capability}: stack {u.stack_bytes} B, local {u.local_bytes} B"
                for u in usages if u.spills]
    assert not spilling, "spills:\n" + "\n".join(spilling)
    for usage in usages:
        assert 0 < usage.registers <= 255
        # opt-in shared memory per block: 163 KiB on A100, 227 KiB on H100
        assert usage.shared_bytes <= (232448 if usage.capability == 90 else 166912)
