"""One backend registry for every op (session attention, InfoNCE, linear cross-entropy).

Each implementation registers itself once with :func:`register`: the op, its backend name, a capability gate
(can it run on this device, and if not, why), a preference rank and the error bound its tests hold it to per
dtype. :func:`resolve` turns a ``backend=`` argument into one implementation:

1. an explicit name (``backend="cpu"``) runs that backend or raises ``ValueError`` with the gate's reason:
   never a silent fallback;
2. ``"auto"`` first reads the environment override ``CONVRET_BACKEND_<OP>`` (e.g.
   ``CONVRET_BACKEND_INFO_NCE=reference``), which is then treated like an explicit name;
3. otherwise the highest-ranked backend that can run on the device and is preferred there (Triton on CPU
   tensors runs only under its interpreter, a debugging mode: it is never picked automatically on CPU).

``convret.available_backends()`` and ``convret.backend_info()`` read this registry.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

Gate = Callable[[torch.device], "str | None"]
Tolerances = Mapping["torch.dtype | tuple[str, torch.dtype]", float]

AUTO = "auto"
ENV_PREFIX = "CONVRET_BACKEND_"


@dataclass(frozen=True)
class Implementation:
    """One registered ``(op, backend)``.

    Attributes:
        op, backend: names, e.g. ``("info_nce", "cpu")``.
        fn: the callable the op's public face calls (its signature is the op's business).
        rank: preference of ``"auto"``; the highest rank that can run wins.
        gate: ``gate(device)`` is None when the backend can run on ``device``, else the reason it cannot.
        auto_devices: device types on which ``"auto"`` may pick it (None: every device its gate admits).
        tolerances: the error bound its tests hold it to against the float64 oracle, by dtype, or by
            ``(device_type, dtype)`` where the device changes the arithmetic (TF32 on a GPU). Each op's tests
            state how the bound is applied (relative to the oracle's magnitude).
        description: one line for :func:`describe`.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    rank: int
    gate: Gate
    auto_devices: tuple[str, ...] | None = None
    tolerances: Mapping[Any, float] = field(default_factory=dict)
    description: str = ""

    def unavailable_reason(self, device: torch.device) -> str | None:
        return self.gate(torch.device(device))

    def tolerance(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
        """The registered bound for ``dtype`` (on ``device`` if it has its own); KeyError if none."""
        device_type = torch.device(device).type
        if (device_type, dtype) in self.tolerances:
            return self.tolerances[(device_type, dtype)]
        if dtype in self.tolerances:
            return self.tolerances[dtype]
        raise KeyError(f"{self.op} backend {self.backend!r} registers no tolerance for {dtype} on {device_type}")


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    *,
    rank: int,
    gate: Gate | None = None,
    auto_devices: tuple[str, ...] | None = None,
    tolerances: Mapping[Any, float] | None = None,
    description: str = "",
) -> Implementation:
    """Make ``fn`` selectable as ``backend=backend`` of ``op`` (registering the same pair again replaces it)."""
    if backend == AUTO:
        raise ValueError("'auto' is not a backend name")
    impl = Implementation(op, backend, fn, rank, gate or any_device, auto_devices, dict(tolerances or {}),
                          description)
    _REGISTRY.setdefault(op, {})[backend] = impl
    return impl


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> list[str]:
    """Every backend registered for ``op``, whether or not it can run here."""
    return sorted(_implementations(op))


def get(op: str, backend: str) -> Implementation:
    impls = _implementations(op)
    if backend not in impls:
        raise ValueError(f"unknown backend {backend!r} for {op}; choose one of {[AUTO, *sorted(impls)]}")
    return impls[backend]


def env_variable(op: str) -> str:
    return ENV_PREFIX + op.upper()


def resolve(op: str, requested: str, device: torch.device | str) -> Implementation:
    """The implementation that runs ``op`` on ``device`` for ``backend=requested`` (see the module docstring).

    Raises:
        ValueError: an unknown name, or a backend (named explicitly or by the environment) that cannot run on
            ``device``; the message carries the gate's reason.
    """
    device = torch.device(device)
    impls = _implementations(op)
    source = "backend"
    if requested == AUTO:
        override = os.environ.get(env_variable(op), "").strip().lower()
        if override and override != AUTO:
            requested, source = override, f"${env_variable(op)}"
    if requested != AUTO:
        if requested not in impls:
            raise ValueError(f"unknown backend {requested!r} for {op} (from {source}); choose one of "
                             f"{[AUTO, *sorted(impls)]}")
        impl = impls[requested]
        reason = impl.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"{op}: backend={requested!r} (from {source}) cannot run on device {device}: {reason}")
        return impl
    candidates = [impl for impl in impls.values()
                  if (impl.auto_devices is None or device.type in impl.auto_devices)
                  and impl.unavailable_reason(device) is None]
    if not candidates:
        reasons = {name: impl.unavailable_reason(device) for name, impl in impls.items()}
        raise ValueError(f"{op}: no backend can run on device {device}: {reasons}")
    return max(candidates, key=lambda impl: impl.rank)


def describe(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Per op: what ``"auto"`` picks on ``device`` (honouring the environment) and each backend's standing."""
    device = torch.device(device)
    out: dict[str, Any] = {}
    for op in ops():
        try:
            auto = resolve(op, AUTO, device).backend
        except ValueError as error:
            auto = f"none ({error})"
        out[op] = {
            "auto": auto,
            "env": env_variable(op),
            "backends": {
                name: {"rank": impl.rank, "runs_here": impl.unavailable_reason(device) is None,
                       "reason": impl.unavailable_reason(device) or "available",
                       "description": impl.description}
                for name, impl in sorted(_implementations(op).items())
            },
        }
    return out


def _implementations(op: str) -> dict[str, Implementation]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered: {ops()}")
    return _REGISTRY[op]


# ------------------------------------------------------------------------------------------------- gates
def any_device(device: torch.device) -> str | None:
    return None


def cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"needs CPU tensors, got device {device}"


_triton_installed: bool | None = None


def triton_gate(device: torch.device) -> str | None:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    global _triton_installed
    if _triton_installed is None:  # looked up once: the gate runs on every call of every layer
        _triton_installed = importlib.util.find_spec("triton") is not None
    if not _triton_installed:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors"
    return f"Triton needs CUDA tensors, got device {device}"
