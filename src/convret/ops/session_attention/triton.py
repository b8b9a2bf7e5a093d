"""Registers the Triton kernels (``convret.kernels.session_attention``) as ``backend="triton"``."""
import torch

from ... import _dispatch
from .common import register_backend


def _triton_session_attention(q, k, v, layout, scale, window=None):
    from ...kernels.session_attention import session_attention_triton

    return session_attention_triton(q, k, v, layout, scale, window=window)


# Bounds of tests/test_session_attention_triton.py, |got - want| <= tol * (1 + |want|) elementwise against the
# float64 oracle: the GPU's fp32 path uses TF32 products (about 1e-3 relative), the interpreter exact fp32.
register_backend(
    "triton", _triton_session_attention, rank=30, gate=_dispatch.triton_gate, auto_devices=("cuda",),
    tolerances={("cuda", torch.float32): 1e-2, torch.float32: 2e-4, torch.float16: 1e-2},
    description="Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1)",
)
