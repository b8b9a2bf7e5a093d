"""convret.info_nce against the float64 oracle: loss, dQ, dP and d(temperature), every backend.

Tolerances: the largest absolute error of each output, divided by the largest magnitude of the oracle's,
must stay below TOLERANCES[(backend, dtype)]. The oracle runs in float64 on the same (already rounded)
inputs, so what remains is the backend's own arithmetic:
- cpu fp32: 2e-5 (fp32 GEMMs; d(temperature) is a sum of cancelling fp32 terms).
- cpu bf16: 1e-2 (computes in fp32; dQ and dP are rounded to bf16, 2^-8 relative).
- triton fp32: 1e-4 (3xTF32 on the GPU, close to fp32; exact fp32 under the interpreter).
- triton fp16: 1e-2 (the gradient GEMMs take dloss/ds in fp16; dQ and dP are rounded to fp16).
"""
from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

import convret
from convret import InfoNCELoss, _dispatch, info_nce

from convret.ops.info_nce import cpu as info_nce_module  # CPU_CHUNK_BYTES, MIN_CHUNK_ROWS live there
from convret.ops import info_nce as contrastive

# the bounds each backend registers with convret._dispatch (values and reasons in the module docstring)
TOLERANCES = {(backend, dtype): _dispatch.get("info_nce", backend).tolerance(dtype)
              for backend, dtype in (("cpu", torch.float32), ("cpu", torch.bfloat16),
                                     ("triton", torch.float32), ("triton", torch.float16))}
SMALL_TRITON_TILES = {"fwd": (16, 16, 16, 1, 1), "dq": (16, 16, 16, 1, 1), "dp": (16, 16, 16, 1, 1)}
# Triton runs on the GPU when there is one, else on CPU tensors under the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 before any kernel module is imported).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_interpreter = pytest.mark.skipif(TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before import")


@contextlib.contextmanager
def cpu_chunk_bytes(num_bytes: int):
    saved = info_nce_module.CPU_CHUNK_BYTES
    info_nce_module.CPU_CHUNK_BYTES = num_bytes
    try:
        yield
    finally:
        info_nce_module.CPU_CHUNK_BYTES = saved


@contextlib.contextmanager
def triton_tiles(configs):
    kernels = importlib.import_module("convret.kernels.info_nce")
    saved = dict(kernels.CONFIGS)
    kernels.CONFIGS.update({"half": configs, "fp32": configs})
    try:
        yield
    finally:
        kernels.CONFIGS.update(saved)


def make_case(seed, num_queries, num_passages, dim, layout, group_size, with_ids, spread):
    """float64 inputs (embeddings of norm ~spread, so that the softmax is neither flat nor one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(num_queries, dim, generator=gen, dtype=torch.float64), dim=-1) * spread
    passages = F.normalize(torch.randn(num_passages, dim, generator=gen, dtype=torch.float64), dim=-1)
    kwargs = {}
    if layout == "labels":
        kwargs["labels"] = torch.randint(0, num_passages, (num_queries,), generator=gen)
    else:
        kwargs["group_size"] = group_size
    if with_ids:
        # few distinct ids: duplicates of the positive are common
        kwargs["passage_ids"] = torch.randint(0, max(2, num_passages // 3), (num_passages,), generator=gen)
    return queries, passages, kwargs


def run(backend, dtype, queries64, passages64, kwargs, temperature, reduction, grad_weights):
    """Loss and gradients of ``sum(loss * grad_weights)`` (scalar weight for mean/sum)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    queries = queries64.to(device=device, dtype=dtype).requires_grad_()
    passages = passages64.to(device=device, dtype=dtype).requires_grad_()
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(temperature, dtype=tau_dtype, device=device, requires_grad=True)
    kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    loss = info_nce(queries, passages, tau, reduction=reduction, backend=backend, **kwargs)
    (loss * grad_weights.to(device=device, dtype=loss.dtype)).sum().backward()
    return [t.detach().cpu().double() for t in (loss, queries.grad, passages.grad, tau.grad)]


def assert_parity(backend, dtype, queries64, passages64, kwargs, temperature, reduction, seed):
    # the oracle sees exactly the rounded values the backend sees
    queries64 = queries64.to(dtype).double()
    passages64 = passages64.to(dtype).double()
    gen = torch.Generator().manual_seed(seed + 1)
    grad_weights = (torch.randn(queries64.shape[0], generator=gen, dtype=torch.float64) if reduction == "none"
                    else torch.tensor(1.7, dtype=torch.float64))
    got = run(backend, dtype, queries64, passages64, kwargs, temperature, reduction, grad_weights)
    want = run("reference", torch.float64, queries64, passages64, kwargs, temperature, reduction, grad_weights)
    tol = TOLERANCES[(backend, dtype)]
    # Absolute floors: a score s carries an error ~ eps * |s| and dloss/ds = p - y one ~ eps (near-one-hot
    # softmax: tiny gradients computed as 0.9999 - 1), so each output is also judged against the size of the
    # terms it sums, not only against its own (possibly tiny) value.
    num_queries = queries64.shape[0]
    max_q, max_p = queries64.norm(dim=1).max().item(), passages64.norm(dim=1).max().item()
    max_score = max_q * max_p / temperature
    row_weight = grad_weights.abs() / (num_queries if reduction == "mean" else 1)
    total_weight = row_weight.sum().item() * (num_queries if row_weight.dim() == 0 else 1)
    floors = {"loss": max_score * (num_queries if reduction == "sum" else 1),
              "dQ": max_p / temperature * row_weight.max().item(),
              "dP": max_q / temperature * total_weight,
              "dtemperature": max_score / temperature * total_weight}
    assert want[1].abs().max() > 0, "dQ of the oracle is 0: this case cannot fail"
    for name, g, w in zip(("loss", "dQ", "dP", "dtemperature"), got, want):
        assert g.shape == w.shape, name
        bound = tol * max(w.abs().max().item(), floors[name])
        err = (g - w).abs().max().item()
        assert err <= bound, f"{backend} {dtype} {name}: max error {err:.3g} > {bound:.3g}"


case_strategy = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "num_queries": st.integers(1, 9),
    "group_size": st.integers(1, 4),
    "extra_passages": st.integers(0, 6),
    "dim": st.integers(2, 40),
    "layout": st.sampled_from(["grouped", "labels"]),
    "with_ids": st.booleans(),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "temperature": st.sampled_from([0.02, 0.1, 1.0]),
    "spread": st.sampled_from([0.3, 1.0]),
})


def _case(c):
    num_passages = c["num_queries"] * c["group_size"] + (c["extra_passages"] if c["layout"] == "labels" else 0)
    assume(num_passages >= 2)  # one candidate: loss and gradients are exactly 0, nothing to compare
    queries, passages, kwargs = make_case(c["seed"], c["num_queries"], num_passages, c["dim"], c["layout"],
                                          c["group_size"], c["with_ids"], c["spread"])
    if "passage_ids" in kwargs:  # every other passage a duplicate of the positive: nothing to compare
        labels = kwargs.get("labels", torch.arange(c["num_queries"]) * c["group_size"])
        masked = contrastive.false_negative_mask(labels, kwargs["passage_ids"]).sum(1)
        assume(bool((masked < num_passages - 1).any()))
    return queries, passages, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=60, deadline=None)
@given(c=case_strategy, chunk_rows=st.sampled_from([1, 3, 1000]))
def test_cpu_matches_oracle(dtype, c, chunk_rows):
    queries, passages, kwargs = _case(c)
    # chunks of `chunk_rows` query rows (MIN_CHUNK_ROWS floors the byte budget, so lower it too)
    saved_min = info_nce_module.MIN_CHUNK_ROWS
    info_nce_module.MIN_CHUNK_ROWS = 1
    try:
        with cpu_chunk_bytes(4 * passages.shape[0] * chunk_rows):
            assert_parity("cpu", dtype, queries, passages, kwargs, c["temperature"], c["reduction"], c["seed"])
    finally:
        info_nce_module.MIN_CHUNK_ROWS = saved_min


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=15, deadline=None)
@given(c=case_strategy)
def test_triton_matches_oracle(dtype, c):
    queries, passages, kwargs = _case(c)
    with triton_tiles(SMALL_TRITON_TILES):
        assert_parity("triton", dtype, queries, passages, kwargs, c["temperature"], c["reduction"], c["seed"])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_several_tiles_each_way(dtype):
    """More than one query, passage and D tile of 16, partial last tiles, duplicates, both layouts."""
    for layout in ("grouped", "labels"):
        queries, passages, kwargs = make_case(7, 21, 42, 37, layout, 2, True, 1.0)
        with triton_tiles(SMALL_TRITON_TILES):
            assert_parity("triton", dtype, queries, passages, kwargs, 0.05, "mean", 7)


@needs_interpreter
def test_triton_default_tiles():
    queries, passages, kwargs = make_case(3, 5, 15, 24, "grouped", 3, True, 1.0)
    assert_parity("triton", torch.float32, queries, passages, kwargs, 0.05, "sum", 3)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_interpreter)])
def test_sharp_logits_stay_finite(backend):
    """tau = 0.01 on unnormalised embeddings: scores in the thousands, the positive's probability underflows."""
    queries, passages, kwargs = make_case(11, 6, 24, 32, "grouped", 4, False, 30.0)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    loss = info_nce(queries.float().to(device), passages.float().to(device), 0.01, backend=backend,
                    reduction="none", **kwargs).cpu()
    want = info_nce(queries, passages, 0.01, backend="reference", reduction="none", **kwargs)
    assert torch.isfinite(loss).all() and want.max() > 100
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-3)


def test_false_negatives_are_dropped_from_the_denominator():
    queries = F.normalize(torch.randn(2, 8, dtype=torch.float64), dim=-1)
    passages = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    ids = torch.tensor([10, 11, 12, 20, 10, 22])  # passage 4 duplicates query 0's positive (passage 0)
    for backend in ("cpu", "reference"):
        got = info_nce(queries, passages, 0.1, group_size=3, passage_ids=ids, reduction="none", backend=backend)
        scores = queries @ passages.T / 0.1
        want0 = torch.logsumexp(scores[0, [0, 1, 2, 3, 5]], 0) - scores[0, 0]
        want1 = torch.logsumexp(scores[1], 0) - scores[1, 3]
        torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_default_layout_is_grouped_with_inferred_group_size():
    queries, passages, _ = make_case(1, 4, 12, 16, "grouped", 3, False, 1.0)
    torch.testing.assert_close(info_nce(queries, passages, backend="cpu"),
                               info_nce(queries, passages, group_size=3, backend="reference"))
    torch.testing.assert_close(info_nce(queries, passages, backend="cpu"),
                               info_nce(queries, passages, labels=torch.arange(4) * 3, backend="reference"))


def test_cpu_second_backward_recomputes():
    """The fused gradients are handed over on the first backward; retain_graph backward recomputes them."""
    queries, passages, kwargs = make_case(5, 6, 18, 16, "grouped", 3, True, 1.0)
    queries.requires_grad_()
    passages.requires_grad_()
    loss = info_nce(queries, passages, 0.05, backend="cpu", **kwargs)
    loss.backward(retain_graph=True)
    first = (queries.grad.clone(), passages.grad.clone())
    queries.grad = passages.grad = None
    (loss * 3.0).backward()
    torch.testing.assert_close(queries.grad, 3.0 * first[0])
    torch.testing.assert_close(passages.grad, 3.0 * first[1])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_interpreter)])
def test_partial_requires_grad_and_no_grad(backend):
    queries, passages, kwargs = make_case(2, 4, 8, 16, "grouped", 2, False, 1.0)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    queries = queries.float().to(device).requires_grad_()
    passages = passages.float().to(device)
    info_nce(queries, passages, 0.05, backend=backend, **kwargs).backward()
    want_q = queries.detach().cpu().double().requires_grad_()
    info_nce(want_q, passages.cpu().double(), 0.05, backend="reference", **kwargs).backward()
    torch.testing.assert_close(queries.grad.cpu().double(), want_q.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        value = info_nce(queries, passages, 0.05, backend=backend, **kwargs)
    assert not value.requires_grad and torch.isfinite(value)


def test_module_learnable_temperature():
    queries, passages, kwargs = make_case(4, 5, 15, 16, "grouped", 3, False, 1.0)
    loss_fn = InfoNCELoss(temperature=0.05, learnable_temperature=True, group_size=3, backend="cpu").double()
    loss_fn(queries, passages).backward()
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    info_nce(queries, passages, tau, group_size=3, backend="reference").backward()
    # d/d(log tau) = tau * d/dtau
    torch.testing.assert_close(loss_fn.log_temperature.grad, 0.05 * tau.grad)
    assert abs(tau.grad.item()) > 1e-3
    assert "temperature=0.05" in repr(loss_fn)
    frozen = InfoNCELoss(temperature=0.05, group_size=3)
    assert not list(frozen.parameters())


def test_public_exports():
    assert convret.info_nce is info_nce and "info_nce" in convret.__all__ and "InfoNCELoss" in convret.__all__


# ------------------------------------------------------------------------------------------ bad input
def _q(n=4, d=8):
    return torch.randn(n, d)


BAD_INPUTS = [
    ("queries 1-D", lambda: info_nce(torch.randn(8), _q(8)), "queries must be a 2-D tensor"),
    ("passages 3-D", lambda: info_nce(_q(), torch.randn(2, 4, 8)), "passages must be a 2-D tensor"),
    ("embedding size mismatch", lambda: info_nce(_q(4, 8), _q(8, 6)), "differ in embedding size"),
    ("dtype mismatch", lambda: info_nce(_q(), _q(8).double()), "different dtypes"),
    ("integer embeddings", lambda: info_nce(torch.ones(4, 8, dtype=torch.long), _q(8)), "floating point"),
    ("empty queries", lambda: info_nce(_q(0), _q(8)), "empty input"),
    ("P not divisible by group_size", lambda: info_nce(_q(), _q(10), group_size=3), "not divisible by group_size"),
    ("P != Q * group_size", lambda: info_nce(_q(), _q(12), group_size=2), r"P == Q \* group_size"),
    ("P not a multiple of Q", lambda: info_nce(_q(4), _q(10)), "multiple of Q"),
    ("group_size 0", lambda: info_nce(_q(), _q(8), group_size=0), "group_size must be a positive int"),
    ("labels and group_size", lambda: info_nce(_q(), _q(8), group_size=2, labels=torch.arange(4)), "not both"),
    ("labels wrong shape", lambda: info_nce(_q(), _q(8), labels=torch.arange(3)), r"labels must be a \[Q\]"),
    ("labels float", lambda: info_nce(_q(), _q(8), labels=torch.zeros(4)), "integer indices"),
    ("label too large", lambda: info_nce(_q(), _q(8), labels=torch.tensor([0, 1, 2, 8])), "labels out of range"),
    ("negative label", lambda: info_nce(_q(), _q(8), labels=torch.tensor([0, -1, 2, 3])), "labels out of range"),
    ("temperature 0", lambda: info_nce(_q(), _q(8), 0.0), "temperature must be finite and > 0"),
    ("temperature negative tensor", lambda: info_nce(_q(), _q(8), torch.tensor(-0.1)), "temperature must be"),
    ("temperature nan", lambda: info_nce(_q(), _q(8), float("nan")), "temperature must be finite"),
    ("temperature vector", lambda: info_nce(_q(), _q(8), torch.tensor([0.1, 0.2])), "floating-point scalar"),
    ("temperature string", lambda: info_nce(_q(), _q(8), "0.1"), "temperature must be a float"),
    ("NaN in queries", lambda: info_nce(torch.tensor([[1.0, float("nan")]] * 4), _q(8, 2)),
     "queries contain NaN or inf"),
    ("inf in passages", lambda: info_nce(_q(4, 2), torch.tensor([[1.0, float("inf")]] * 8)),
     "passages contain NaN or inf"),
    ("passage_ids wrong shape", lambda: info_nce(_q(), _q(8), passage_ids=torch.arange(7)), "passage_ids must be"),
    ("passage_ids float", lambda: info_nce(_q(), _q(8), passage_ids=torch.zeros(8)), "passage_ids must be integers"),
    ("unknown reduction", lambda: info_nce(_q(), _q(8), reduction="avg"), "reduction must be one of"),
    ("unknown backend", lambda: info_nce(_q(), _q(8), backend="cuda"), "unknown backend"),
    ("gather without process group", lambda: info_nce(_q(), _q(8), gather=True), "process group"),
]


@pytest.mark.parametrize("call, message", [(c, m) for _, c, m in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_overflowing_sum_is_not_mistaken_for_nan():
    """The cheap finiteness check sums the input; a sum that overflows fp16 must not raise."""
    queries = torch.full((4, 8), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(queries.sum())
    loss = info_nce(queries, torch.randn(8, 8, dtype=torch.float16), 1e4, backend="reference")
    assert torch.isfinite(loss)
