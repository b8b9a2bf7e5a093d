"""Registers the Triton kernels (``convret.kernels.session_attention``) as ``backend="triton"``."""
from .attention import register_backend


def _triton_session_attention(q, k, v, layout, scale):
    from .kernels.session_attention import session_attention_triton

    return session_attention_triton(q, k, v, layout, scale)


register_backend("triton", _triton_session_attention)
