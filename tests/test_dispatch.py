"""The one backend registry (convret._dispatch) and the safety checks every op shares: explicit requests never
fall back silently, the environment override, backend_info, double backward, label range, float64 exactness."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import convret
from convret import SessionLayout, _dispatch, info_nce, linear_cross_entropy, session_attention

OPS = ("session_attention", "info_nce", "linear_cross_entropy")
needs_interpreter = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before import")


@pytest.fixture
def toy_op():
    """A throw-away op with three backends, removed again afterwards."""
    calls = []
    _dispatch.register("toy", "slow", lambda: calls.append("slow"), rank=0)
    _dispatch.register("toy", "fast", lambda: calls.append("fast"), rank=10, gate=_dispatch.cpu_only,
                       tolerances={torch.float32: 1e-5, ("cuda", torch.float32): 1e-3})
    _dispatch.register("toy", "gpu", lambda: calls.append("gpu"), rank=20, auto_devices=("cuda",))
    yield calls
    del _dispatch._REGISTRY["toy"]


def test_auto_takes_the_best_backend_that_runs_and_is_preferred_there(toy_op):
    assert _dispatch.resolve("toy", "auto", "cpu").backend == "fast"  # "gpu" runs anywhere but is auto on cuda only
    assert _dispatch.resolve("toy", "auto", "meta").backend == "slow"  # "fast" cannot run on meta
    assert _dispatch.resolve("toy", "gpu", "cpu").backend == "gpu"  # explicit requests may take it


def test_an_explicit_backend_that_cannot_run_raises_with_the_reason(toy_op):
    with pytest.raises(ValueError, match="backend='fast'.*cannot run on device meta: needs CPU tensors"):
        _dispatch.resolve("toy", "fast", "meta")
    with pytest.raises(ValueError, match="unknown backend 'nope' for toy"):
        _dispatch.resolve("toy", "nope", "cpu")


def test_environment_override_is_an_explicit_request(toy_op, monkeypatch):
    monkeypatch.setenv("CONVRET_BACKEND_TOY", "slow")
    _dispatch.resolve("toy", "auto", "cpu").fn()
    assert toy_op == ["slow"]
    assert _dispatch.resolve("toy", "fast", "cpu").backend == "fast"  # an argument wins over the environment
    monkeypatch.setenv("CONVRET_BACKEND_TOY", "fast")
    with pytest.raises(ValueError, match=r"\$CONVRET_BACKEND_TOY"):
        _dispatch.resolve("toy", "auto", "meta")
    monkeypatch.setenv("CONVRET_BACKEND_TOY", "warp")
    with pytest.raises(ValueError, match=r"unknown backend 'warp'.*\$CONVRET_BACKEND_TOY"):
        _dispatch.resolve("toy", "auto", "cpu")


def test_tolerances_by_dtype_and_device(toy_op):
    fast = _dispatch.get("toy", "fast")
    assert fast.tolerance(torch.float32) == 1e-5 and fast.tolerance(torch.float32, "cuda") == 1e-3
    with pytest.raises(KeyError, match="bfloat16"):
        fast.tolerance(torch.bfloat16)


def test_every_op_is_registered_and_reported():
    info = convret.backend_info()
    assert "implementation" in info  # the CPU session-attention details stay at the top level
    assert set(OPS) <= set(info["ops"])
    assert info["ops"]["session_attention"]["auto"] == "cpu"
    assert info["ops"]["info_nce"]["auto"] == "cpu"
    assert info["ops"]["linear_cross_entropy"]["auto"] == "torch"
    for op in OPS:
        assert convret.available_backends(op) == _dispatch.backends(op)
        assert "triton" in convret.available_backends(op)
    assert "reference" in convret.available_backends("info_nce", "meta")
    assert "cpu" not in convret.available_backends("info_nce", "meta")


def test_ops_raise_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the gate reads it at call time
    layout = SessionLayout.from_segments([[(5, 2, 3)]], seq_len=10)
    q = torch.randn(1, 2, 10, 32)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        session_attention(q, q, q, layout, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        info_nce(torch.randn(2, 8), torch.randn(4, 8), backend="triton")
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2]), backend="triton")


def test_environment_override_reaches_each_op(monkeypatch):
    monkeypatch.setenv("CONVRET_BACKEND_INFO_NCE", "reference")
    monkeypatch.setenv("CONVRET_BACKEND_SESSION_ATTENTION", "reference")
    q, p = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    got = info_nce(q, p, 0.05)
    assert torch.equal(got, info_nce(q, p, 0.05, backend="reference"))
    assert convret.backend_info()["ops"]["info_nce"]["auto"] == "reference"
    layout = SessionLayout.from_segments([[(6, 2, 4)]], seq_len=12)
    x = torch.randn(1, 2, 12, 32)
    assert torch.equal(session_attention(x, x, x, layout), session_attention(x, x, x, layout, backend="reference"))
    monkeypatch.setenv("CONVRET_BACKEND_LINEAR_CROSS_ENTROPY", "cuda-magic")
    with pytest.raises(ValueError, match="CONVRET_BACKEND_LINEAR_CROSS_ENTROPY"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("bad", [5, -1, 1000])
def test_linear_cross_entropy_labels_out_of_range_raise(bad):
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    labels = torch.tensor([0, 4, -100, bad])
    with pytest.raises(ValueError, match=r"labels must be in \[0, V=5\)"):
        linear_cross_entropy(hidden, weight, labels)


def test_linear_cross_entropy_custom_ignore_index():
    hidden, weight = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    labels = torch.tensor([0, 4, -1, 2])
    got = linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    torch.testing.assert_close(got, F.cross_entropy(hidden @ weight.T, labels, ignore_index=-1))
    with pytest.raises(ValueError, match="ignore_index=-1"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 4, -100, 2]), ignore_index=-1)
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(hidden, weight, labels.double())


# ------------------------------------------------------------------------------------------ double backward
def _double_backward(fn, *inputs):
    """A second-order term through ``fn``: the incoming gradient of ``fn``'s output depends on the inputs
    (``weight``), so without ``once_differentiable`` the backward would run on a graph that silently lacks
    ``fn``'s own second derivative."""
    weight = inputs[0].sum()
    grads = torch.autograd.grad((fn(*inputs) * weight).sum(), inputs, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()


DOUBLE_BACKWARD_CASES = {
    "linear_cross_entropy": lambda: (
        lambda h, w: linear_cross_entropy(h, w, torch.tensor([1, 0, 3])),
        torch.randn(3, 8, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 8, dtype=torch.float64, requires_grad=True)),
    "info_nce cpu": lambda: (
        lambda q, p: info_nce(q, p, 0.1, backend="cpu"),
        torch.randn(2, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)),
    "session_attention cpu": lambda: (
        lambda q, k: session_attention(q, k, k, SessionLayout.from_segments([[(5, 2, 3)]], 10), backend="cpu"),
        torch.randn(1, 2, 10, 32, requires_grad=True), torch.randn(1, 2, 10, 32, requires_grad=True)),
}
TRITON_DOUBLE_BACKWARD_CASES = {
    "info_nce triton": lambda: (
        lambda q, p: info_nce(q, p, 0.1, backend="triton"),
        torch.randn(2, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)),
    "session_attention triton": lambda: (
        lambda q, k: session_attention(q, k, k, SessionLayout.from_segments([[(9, 2, 5)]], 16), backend="triton"),
        torch.randn(1, 2, 16, 32, requires_grad=True), torch.randn(1, 2, 16, 32, requires_grad=True)),
}


@pytest.mark.parametrize("case", sorted(DOUBLE_BACKWARD_CASES))
def test_double_backward_raises_instead_of_dropping_terms(case):
    fn, *inputs = DOUBLE_BACKWARD_CASES[case]()
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _double_backward(fn, *inputs)


@needs_interpreter
@pytest.mark.parametrize("case", sorted(TRITON_DOUBLE_BACKWARD_CASES))
def test_double_backward_raises_triton(case):
    fn, *inputs = TRITON_DOUBLE_BACKWARD_CASES[case]()
    if torch.cuda.is_available():
        inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _double_backward(fn, *inputs)


# ------------------------------------------------------------------------------------------ float64 InfoNCE
def _sentence_transformers_mnrl(anchors, positives, negatives, scale):
    """sentence-transformers' MultipleNegativesRankingLoss on given embeddings (its own code, no model), with
    dot-product similarity as info_nce uses (on normalised embeddings it equals the default cosine)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import dot_score

    loss = MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=dot_score)
    return loss.compute_loss_from_embeddings(
        [anchors, positives, negatives], labels=None)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_float64_info_nce_matches_sentence_transformers_exactly(backend, temperature):
    """Float temperature with float64 embeddings: no rounding of tau to fp32 (that alone moves the loss by
    ~3e-8 relative), so the loss and gradients agree with MultipleNegativesRankingLoss to float64 rounding."""
    gen = torch.Generator().manual_seed(int(1 / temperature))
    anchors, positives, negatives = (F.normalize(torch.randn(6, 32, generator=gen, dtype=torch.float64), dim=-1)
                                     for _ in range(3))
    inputs = [t.clone().requires_grad_() for t in (anchors, positives, negatives)]
    want = _sentence_transformers_mnrl(*inputs, scale=1.0 / temperature)
    want_grads = torch.autograd.grad(want, inputs)
    q, pos, neg = (t.clone().requires_grad_() for t in (anchors, positives, negatives))
    got = info_nce(q, torch.cat([pos, neg]), temperature, labels=torch.arange(6), backend=backend)
    assert got.dtype == torch.float64
    got_grads = torch.autograd.grad(got, [q, pos, neg])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


def test_float64_module_keeps_the_exact_temperature():
    gen = torch.Generator().manual_seed(0)
    q, p = (F.normalize(torch.randn(n, 16, generator=gen, dtype=torch.float64), dim=-1) for n in (4, 8))
    module = convret.InfoNCELoss(temperature=0.01, group_size=2)
    want = F.cross_entropy(q @ p.T / 0.01, torch.arange(4) * 2)
    torch.testing.assert_close(module(q, p), want, rtol=1e-13, atol=0)
