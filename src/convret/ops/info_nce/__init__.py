"""InfoNCE over in-batch and hard negatives without the ``[Q, P]`` score matrix: the public face.

:func:`info_nce` (functional) and :class:`InfoNCELoss` (module) validate their inputs and dispatch through
``convret._dispatch`` (op ``"info_nce"``) to one of:

- ``"triton"``: fused kernels (``convret.kernels.info_nce``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``;
- ``"cpu"``: :class:`ChunkedInfoNCE` (``convret.ops.info_nce.cpu``), query chunks against all passages, the
  gradients produced in the forward pass;
- ``"reference"``: ``F.cross_entropy`` on the full logits, the oracle (O(Q * P) memory,
  ``convret.ops.info_nce.reference``).

``gather=True`` all-gathers the passages of every rank first (``convret.ops.info_nce.gather``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import _dispatch
from .cpu import CPU_CHUNK_BYTES, MIN_CHUNK_ROWS, ChunkedInfoNCE, chunked_info_nce  # noqa: F401
from .gather import gather_passages
from .reference import false_negative_mask, reference_info_nce  # noqa: F401

OP = "info_nce"
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["info_nce", "InfoNCELoss", "ChunkedInfoNCE", "false_negative_mask", "gather_passages",
           "reference_info_nce"]


def info_nce(
    queries: torch.Tensor,
    passages: torch.Tensor,
    temperature: float | torch.Tensor = 0.01,
    group_size: int | None = None,
    labels: torch.Tensor | None = None,
    passage_ids: torch.Tensor | None = None,
    gather: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE of each query against its positive, its hard negatives and every other passage in the batch.

    ``loss_i = logsumexp_j(s_ij) - s_i,pos_i`` with ``s_ij = queries[i] . passages[j] / temperature``.

    Args:
        queries: ``[Q, D]``, fp32, fp16 or bf16 (accumulation is always fp32).
        passages: ``[P, D]``, same dtype and device as ``queries``.
        temperature: a positive float, or a 0-d tensor (it receives a gradient: learnable temperature).
        group_size: Tevatron / GRIT layout (the default): ``P = Q * group_size``; passage ``i * group_size`` is
            query i's positive, the next ``group_size - 1`` its hard negatives. When neither ``group_size`` nor
            ``labels`` is given, ``group_size = P // Q``.
        labels: ``[Q]`` integer index of each query's positive in ``passages`` (sentence-transformers column
            layout, e.g. ``[P_1..P_B, N1_1..N1_B, ...]`` with ``labels = arange(B)``). Exclusive with
            ``group_size``.
        passage_ids: ``[P]`` integer ids; a passage whose id equals the id of query i's positive (other than
            the positive itself) is a false negative and left out of query i's denominator.
        gather: under ``torch.distributed``, score the local queries against the passages of every rank.
            Gradients flow back to the rank that owns each passage. Every rank must pass the same Q and P.
            Convention: with ``reduction="mean"`` the result is the mean over this rank's queries, with
            ``"sum"`` it is ``world_size`` times the sum over this rank's queries. Either way the average of
            the result over ranks is the single-process loss on the concatenated global batch, and after DDP's
            gradient averaging the parameter gradients equal single-process training on that batch.
            ``"none"`` returns this rank's per-query losses, unscaled.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[Q]`` per-query losses).
        backend: ``"triton"``, ``"cpu"``, ``"reference"`` or ``"auto"`` (``$CONVRET_BACKEND_INFO_NCE`` if set,
            else triton on CUDA, cpu on CPU, reference elsewhere). A named backend that cannot run on the
            inputs' device raises ``ValueError`` with the reason.

    Returns:
        fp32 (float64 for float64 inputs) loss: a scalar, or ``[Q]`` for ``reduction="none"``. A float
        ``temperature`` is used in float64 for float64 inputs (exact), in fp32 otherwise.
    """
    labels = _check_and_make_labels(queries, passages, temperature, group_size, labels, passage_ids, reduction)
    impl = _dispatch.resolve(OP, backend, queries.device)
    world_size = 1
    if gather:
        passages, labels, passage_ids, world_size = gather_passages(queries, passages, labels, passage_ids)

    if isinstance(temperature, torch.Tensor):
        temperature = temperature.reshape(())
    else:
        tau_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        temperature = torch.tensor(float(temperature), dtype=tau_dtype, device=queries.device)
    loss = impl.fn(queries, passages, temperature, labels, passage_ids, reduction)
    if reduction == "sum" and world_size > 1:
        loss = loss * world_size
    return loss


class TemperatureMixin:
    """The InfoNCE temperature of a loss module, fixed or learnable, as ``log_temperature``.

    Learnable: ``log_temperature`` is a parameter (``log tau``, so tau stays positive; add the module's
    parameters to the optimizer). Fixed: a non-persistent float64 buffer, and :attr:`temperature` is the exact
    Python float, so that casting the module (``.float()``, ``.half()``) never rounds it. Call
    :meth:`_init_temperature` from ``__init__`` after ``nn.Module.__init__``.
    """

    log_temperature: torch.Tensor
    learnable_temperature: bool

    def _init_temperature(self, temperature: float, learnable: bool) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.learnable_temperature = bool(learnable)
        self._fixed_temperature = float(temperature)
        if learnable:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        else:
            self.register_buffer("log_temperature", torch.tensor(math.log(temperature), dtype=torch.float64),
                                 persistent=False)

    @property
    def temperature(self) -> float | torch.Tensor:
        """The current tau: a 0-d tensor with gradient when learnable, the exact float when fixed."""
        return self.log_temperature.exp() if self.learnable_temperature else self._fixed_temperature

    def temperature_value(self) -> float:
        """The current tau as a float (for logging and saving)."""
        return float(self.log_temperature.detach().exp())


class InfoNCELoss(TemperatureMixin, nn.Module):
    """Contrastive loss of a dense retriever: each query against its positive, its hard negatives and every
    other passage of the (optionally global, multi-GPU) batch, computed without the ``[Q, P]`` score matrix.

    ``loss = mean_i [ logsumexp_j (q_i . p_j / tau) - q_i . p_pos(i) / tau ]`` (InfoNCE, van den Oord et al.
    2018, "Representation Learning with Contrastive Predictive Coding"; used with tau = 0.01 and 4 hard
    negatives by ChatRetriever's CSIT, Mao et al., ACL 2024 Findings).

    Shapes:
        queries ``[Q, D]``; passages ``[Q * group_size, D]`` grouped per query as ``[pos, neg_1 .. neg_k]``
        (Tevatron layout), or any ``[P, D]`` with ``labels [Q]``; optional ``passage_ids [P]`` mask duplicates
        of the positive. Output: a scalar (``[Q]`` with ``reduction="none"``).

    Args:
        temperature: initial tau.
        learnable_temperature: make tau a parameter, stored as ``log(tau)`` so it stays positive.
        group_size, gather, reduction, backend: as in :func:`info_nce`.

    Example::

        >>> loss_fn = InfoNCELoss(temperature=0.01, group_size=5)
        >>> q = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
        >>> p = torch.nn.functional.normalize(torch.randn(40, 64), dim=-1)
        >>> loss = loss_fn(q, p)
    """

    def __init__(
        self,
        temperature: float = 0.01,
        learnable_temperature: bool = False,
        group_size: int | None = None,
        gather: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.group_size = group_size
        self.gather = gather
        self.reduction = reduction
        self.backend = backend
        self._init_temperature(temperature, learnable_temperature)

    def forward(
        self,
        queries: torch.Tensor,
        passages: torch.Tensor,
        labels: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(queries, passages, self.temperature, group_size=None if labels is not None else self.group_size,
                        labels=labels, passage_ids=passage_ids, gather=self.gather, reduction=self.reduction,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature_value():.4g}, group_size={self.group_size}, gather={self.gather}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


# ------------------------------------------------------------------------------------------ validation
def _check_and_make_labels(queries, passages, temperature, group_size, labels, passage_ids, reduction):
    """Validate everything and return the ``[Q]`` int64 positive index of each (local) query."""
    for name, t in (("queries", queries), ("passages", passages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, D], got shape {tuple(getattr(t, 'shape', ()))}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    num_queries, dim = queries.shape
    num_passages = passages.shape[0]
    if passages.shape[1] != dim:
        raise ValueError(f"queries and passages differ in embedding size: queries {tuple(queries.shape)}, "
                         f"passages {tuple(passages.shape)}")
    if num_queries == 0 or num_passages == 0 or dim == 0:
        raise ValueError(f"empty input: queries {tuple(queries.shape)}, passages {tuple(passages.shape)}")
    if queries.dtype != passages.dtype:
        raise ValueError(f"queries and passages have different dtypes: {queries.dtype} and {passages.dtype}")
    if queries.device != passages.device:
        raise ValueError(f"queries and passages on different devices: {queries.device} and {passages.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature tensor must be a floating-point scalar, got shape "
                             f"{tuple(temperature.shape)} and dtype {temperature.dtype}")
        if temperature.device != queries.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature on {temperature.device}, queries on {queries.device}")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")

    if labels is not None and group_size is not None:
        raise ValueError("pass either group_size (grouped layout) or labels (explicit positives), not both")
    if labels is None:
        if group_size is None:
            if num_passages % num_queries != 0:
                raise ValueError(f"default grouped layout needs P to be a multiple of Q, got Q={num_queries}, "
                                 f"P={num_passages}; pass labels for another layout")
            group_size = num_passages // num_queries
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if num_passages % group_size != 0:
            raise ValueError(f"P={num_passages} is not divisible by group_size={group_size}")
        if num_passages != num_queries * group_size:
            raise ValueError(f"grouped layout needs P == Q * group_size, got P={num_passages}, Q={num_queries}, "
                             f"group_size={group_size}")
        labels = torch.arange(num_queries, device=queries.device) * group_size
    else:
        if not isinstance(labels, torch.Tensor) or labels.shape != (num_queries,):
            raise ValueError(f"labels must be a [Q] = [{num_queries}] tensor, got shape "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels must be integer indices, got {labels.dtype}")
        labels = labels.to(device=queries.device, dtype=torch.int64)

    if passage_ids is not None:
        if not isinstance(passage_ids, torch.Tensor) or passage_ids.shape != (num_passages,):
            raise ValueError(f"passage_ids must be a [P] = [{num_passages}] tensor, got shape "
                             f"{tuple(getattr(passage_ids, 'shape', ()))}")
        if passage_ids.dtype.is_floating_point or passage_ids.is_complex():
            raise ValueError(f"passage_ids must be integers, got {passage_ids.dtype}")
        if passage_ids.device != queries.device:
            raise ValueError(f"passage_ids on {passage_ids.device}, queries on {queries.device}")

    # One host sync for every value check.
    # A NaN or inf anywhere makes the sum non-finite; the sum allocates nothing the size of the input. Only
    # a non-finite sum (a bad value or an overflow of the sum itself) pays for the exact check.
    checks = [
        (labels.min() < 0) | (labels.max() >= num_passages),
        ~torch.isfinite(queries.detach().sum()),
        ~torch.isfinite(passages.detach().sum()),
    ]
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(queries.device)
        checks.append(~torch.isfinite(t).all() | (t <= 0).any())
    labels_bad, queries_bad, passages_bad, *tau_bad = torch.stack([c.reshape(()) for c in checks]).tolist()
    if labels_bad:
        raise ValueError(f"labels out of range [0, P={num_passages}): min {labels.min().item()}, "
                         f"max {labels.max().item()}")
    for name, t, suspect in (("queries", queries, queries_bad), ("passages", passages, passages_bad)):
        if suspect and not torch.isfinite(t.detach()).all():
            raise ValueError(f"{name} contain NaN or inf")
    if (tau_bad and tau_bad[0]) or (not isinstance(temperature, torch.Tensor)
                                   and not (math.isfinite(temperature) and temperature > 0)):
        value = temperature.item() if isinstance(temperature, torch.Tensor) else temperature
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return labels




def _triton_info_nce(queries, passages, temperature, labels, passage_ids, reduction):
    from ...kernels.info_nce import info_nce_triton

    return info_nce_triton(queries, passages, temperature, labels, passage_ids, reduction)


# Bounds of tests/test_info_nce.py: max |error| of loss, dQ, dP and d(temperature) against the float64 oracle,
# relative to the largest magnitude of the oracle's output (or of the terms it sums).
_dispatch.register(OP, "triton", _triton_info_nce, rank=30, gate=_dispatch.triton_gate, auto_devices=("cuda",),
                   tolerances={torch.float32: 1e-4, torch.float16: 1e-2},
                   description="fused Triton kernels, no [Q, P] matrix (CUDA; CPU only under TRITON_INTERPRET=1)")
_dispatch.register(OP, "cpu", chunked_info_nce, rank=20, gate=_dispatch.cpu_only,
                   tolerances={torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2},
                   description="query chunks against all passages, gradients in the forward pass")
_dispatch.register(OP, "reference", reference_info_nce, rank=0,
                   description="F.cross_entropy on the full [Q, P] logits (O(Q * P) memory), any device")
BACKENDS = ("auto", *_dispatch.backends(OP))
