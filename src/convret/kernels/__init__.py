"""Triton kernels of convret, installed as ``convret.kernels`` (never as a top-level ``kernels`` package)."""
