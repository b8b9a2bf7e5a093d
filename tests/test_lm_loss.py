"""convret.linear_cross_entropy against the full-logits oracle F.cross_entropy(hidden @ W.T + b, ...)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from convret import _dispatch
from convret.ops.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy


def make_inputs(tokens, hidden_size, vocab, dtype, seed, bias=True, ignore_fraction=0.3, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (tokens,) if batch is None else (batch, tokens)
    hidden = torch.randn(*shape, hidden_size, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=dtype) / hidden_size**0.5).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_fraction] = -100
    return hidden, weight, b, labels


def oracle(hidden, weight, bias, labels, eps, reduction="mean"):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1), label_smoothing=eps,
                           ignore_index=-100, reduction=reduction)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_full_logits_oracle_float64(eps, chunk_size, reduction, bias):
    hidden, weight, b, labels = make_inputs(23, 16, 50, torch.float64, seed=3, bias=bias, batch=2)
    loss = linear_cross_entropy(hidden, weight, labels, b, label_smoothing=eps, reduction=reduction,
                                chunk_size=chunk_size)
    expected = oracle(hidden, weight, b, labels, eps, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_of(loss, [hidden, weight, b]), grads_of(expected, [hidden, weight, b])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_and_module_form():
    hidden, weight, b, labels = make_inputs(40, 32, 300, torch.float32, seed=5)
    module = LinearCrossEntropy(label_smoothing=0.1, chunk_size=16)
    loss = module(hidden, weight, labels, b)
    expected = oracle(hidden.double(), weight.double(), b.double(), labels, 0.1)
    tol = _dispatch.get("linear_cross_entropy", "torch").tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=1e-6)
    got = grads_of(loss, [hidden, weight, b])
    want = grads_of(expected, [hidden, weight, b])  # through the float64 copies, back to the fp32 leaves
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_only_requested_gradients_and_frozen_head():
    hidden, weight, _, labels = make_inputs(10, 8, 20, torch.float64, seed=1, bias=False)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
    (grad_hidden,) = torch.autograd.grad(loss, [hidden])
    (expected,) = torch.autograd.grad(oracle(hidden, weight, None, labels, 0.1), [hidden])
    torch.testing.assert_close(grad_hidden, expected)


def test_no_labelled_token_gives_zero_not_nan():
    hidden, weight, _, labels = make_inputs(6, 8, 20, torch.float32, seed=2, bias=False)
    labels.fill_(-100)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_rejects_bad_arguments():
    hidden, weight, _, labels = make_inputs(6, 8, 20, torch.float32, seed=2, bias=False)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.t(), labels)


TRITON_ON_CPU_PROBE = """
import torch
from convret.ops.linear_cross_entropy import linear_cross_entropy
try:
    linear_cross_entropy(torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3]), backend="triton")
except ValueError as error:
    print("ValueError:", error)
else:
    print("no error")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on a CUDA machine: covered by the GPU run")
def test_triton_backend_on_cpu_without_the_interpreter_raises():
    """A fresh process without TRITON_INTERPRET (this test process has it set by conftest.py): an explicit
    backend='triton' on CPU tensors raises with the reason instead of falling back or crashing in Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRITON_ON_CPU_PROBE], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ValueError:" in result.stdout and "backend='triton'" in result.stdout, result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout  # the message says how to run it on CPU


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("vocab", [37, 300])
def test_triton_kernel(dtype, eps, vocab):
    """The CUDA path's row kernel (on CPU: the Triton interpreter), tiny shapes, fp32 and fp16 inputs, held to
    the tolerance the backend registers (relative loss error; 10x that for the gradients' relative norm)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = _dispatch.get("linear_cross_entropy", "triton").tolerance(dtype, device)
    g = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(2, 9, 16, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, 16, generator=g) / 4).to(device, dtype).requires_grad_()
    bias = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, 9), generator=g).to(device)
    labels[0, :3] = -100
    loss = linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=eps, chunk_size=5, backend="triton")
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref = F.cross_entropy((h64 @ w64.t() + b64).view(-1, vocab), labels.view(-1), label_smoothing=eps)
    want = torch.autograd.grad(ref, [h64, w64, b64])
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() <= 10 * tol
