"""The distributed engines of ``convret train``: what each one needs, and the proof that the requested one runs.

An engine is asked for with the Trainer's own options:

- none under ``torchrun``: DDP (every rank holds the whole model, gradients all-reduced);
- ``--fsdp`` (``fsdp: true`` + ``fsdp_config`` in a config): FSDP2, ``torch.distributed.fsdp.fully_shard``
  applied by accelerate (parameters, gradients and optimizer states sharded per decoder layer);
- ``--deepspeed ds.json`` (or a ``deepspeed:`` mapping): DeepSpeed ZeRO stage 1, 2 or 3.

Accelerate keeps its state process-wide and enables FSDP only for GPU-class process groups: CPU processes
(gloo) keep DDP and ignore the FSDP plugin without a word. :func:`enable_fsdp_on_cpu` switches that state to FSDP
(the sharding itself stays accelerate's and torch's), and :func:`verify_engine` fails the run when the engine
in force is not the one requested, so a requested engine never silently becomes DDP.

Checkpoints under the sharded engines (FSDP2, ZeRO-3): the Trainer's training state is written sharded (FSDP2:
``torch.distributed.checkpoint`` shards, ``fsdp_config.state_dict_type`` SHARDED_STATE_DICT by default here;
ZeRO-3: DeepSpeed's per-rank partitions) for resume, and the retriever files beside it are consolidated: the
full state dict is gathered to rank 0 (:func:`gathered_state_dict`) and loaded into a parameter-free copy of the
model taken before sharding (:func:`meta_copy`, :func:`plain_model`), which is then written like any DDP model,
so ``convret encode``, ``export`` and ``serve`` load ``checkpoint-N/`` and ``final/`` as they load any other.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["EngineError", "requested_engine", "check_request", "check_resume_engine", "enable_fsdp_on_cpu", "verify_engine",
           "is_sharded", "is_partitioned", "meta_copy", "plain_model", "gathered_state_dict", "deepspeed_config", "ENGINE_VERSIONS",
           "building_plain_model"]

# What each engine needs beyond convret's floors (older versions are refused with this message); proven by
# tests/test_train_engines.py at these versions and the newest. FSDP2: accelerate 1.14 is the first to give the
# LM head its own FSDP2 unit kept unsharded from the forward to the backward, where convret's chunked LM loss
# reads its weight (1.3 has no FSDP2; 1.6 to 1.13 reshard the head after the forward: checked, refused by the
# loss's own check).
ENGINE_VERSIONS: dict[str, dict[str, str]] = {
    "fsdp2": {"accelerate": "1.14"},
    "deepspeed": {"deepspeed": "0.19.8"},
}


class EngineError(ValueError):
    """A requested engine cannot run as asked (the message says why and what to change)."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _require(engine: str) -> None:
    for package, minimum in ENGINE_VERSIONS[engine].items():
        try:
            found = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise EngineError(f"the {engine} engine needs the package {package} >= {minimum}, which is not "
                              f"installed (pip install '{package}>={minimum}')") from None
        if _version_tuple(found) < _version_tuple(minimum):
            raise EngineError(f"the {engine} engine needs {package} >= {minimum} (installed: {found}); "
                              f"pip install -U '{package}>={minimum}'")


def deepspeed_config(args: Any) -> dict | None:
    """The DeepSpeed configuration of ``args.deepspeed`` (a JSON file or a mapping), or ``None``."""
    value = getattr(args, "deepspeed", None)
    if not value:
        return None
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    if isinstance(value, dict):
        return value
    path = Path(value)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise EngineError(f"--deepspeed {value}: not a readable DeepSpeed JSON config ({error})") from error


def _zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def requested_engine(args: Any) -> str:
    """``"fsdp2"``, ``"zero1"``, ``"zero2"``, ``"zero3"`` or ``"ddp"`` (DDP under torchrun, one process
    otherwise) for parsed training arguments."""
    config = deepspeed_config(args)
    if config is not None:
        return f"zero{_zero_stage(config)}"
    if getattr(args, "fsdp", None):
        return "fsdp2"
    return "ddp"


def is_sharded(engine: str) -> bool:
    """Parameters sharded over the ranks (no rank holds the whole model): FSDP2 and ZeRO-3."""
    return engine in ("fsdp2", "zero3")


def check_request(args: Any, learnable_temperature: bool = False) -> str:
    """Refuse, before anything is built, an engine that cannot run as asked; returns the engine's name.

    Also sets convret's FSDP default: training state saved sharded (``state_dict_type`` SHARDED_STATE_DICT)
    unless ``fsdp_config`` names another.

    Raises:
        EngineError: FSDP and DeepSpeed together, no torchrun, FSDP1, ZeRO stage 0, a ZeRO-3 config that does
            not gather its weights on save, a learnable temperature under FSDP2 / DeepSpeed, a version below
            :data:`ENGINE_VERSIONS`.
    """
    engine = requested_engine(args)
    if engine.startswith("zero") and getattr(args, "fsdp", None):
        raise EngineError("--fsdp and --deepspeed exclude each other: choose one engine")
    if engine != "ddp" and "LOCAL_RANK" not in os.environ:
        raise EngineError(f"the {engine} engine runs under torchrun, also with one process: torchrun "
                          "--nproc_per_node N -m convret train ... (see docs/train.md, Engines)")
    if engine == "fsdp2":
        fsdp_config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        version = int(fsdp_config.get("version", 2))
        if version != 2:
            raise EngineError(f"fsdp_config version {version}: convret runs FSDP2 (fully_shard) only; FSDP1 is "
                              "deprecated by transformers. Set fsdp_config version 2 (the default)")
    elif engine.startswith("zero"):
        config = deepspeed_config(args)
        stage = _zero_stage(config)
        if stage not in (1, 2, 3):
            raise EngineError(f"--deepspeed: zero_optimization stage {stage}; convret runs ZeRO stages 1, 2 and 3 "
                              "(stage 0 is DDP: run without --deepspeed)")
        if stage == 3 and not (config.get("zero_optimization") or {}).get(
                "stage3_gather_16bit_weights_on_model_save", False):
            raise EngineError("--deepspeed: ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"
                              " true: convret writes consolidated retriever weights into every checkpoint and "
                              "final/, which needs it (set it to true)")
    if learnable_temperature and engine != "ddp":
        raise EngineError(f"--learnable_temperature is not supported under {engine}: the temperature is a parameter "
                          "of the loss, not of the model, and the sharded optimizers of FSDP2 and DeepSpeed hold only "
                          "the model's parameters. Use a fixed --temperature, or DDP")
    if engine != "ddp":
        _require("fsdp2" if engine == "fsdp2" else "deepspeed")
    if engine == "fsdp2" and "state_dict_type" not in fsdp_config and args.fsdp_plugin_args is not None:
        fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"
        args.fsdp_plugin_args["state_dict_type"] = "SHARDED_STATE_DICT"
    return engine


def check_resume_engine(checkpoint: str | Path, engine: str) -> None:
    """Refuse to resume ``checkpoint`` under another engine than the one that wrote it: each engine keeps its
    optimizer state in its own format (``optimizer.pt``, FSDP2's ``optimizer_0/`` shards, DeepSpeed's
    ``global_stepN/`` partitions), and the Trainer skips a state it does not find without a word, so the resumed
    run would restart AdamW from zero. A checkpoint that records no engine (an older convret) is not checked."""
    from .checkpoint import CONFIG_NAME

    try:
        extra = json.loads((Path(checkpoint) / CONFIG_NAME).read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, json.JSONDecodeError):
        return
    recorded = extra.get("engine")
    if recorded is not None and recorded != engine:
        raise EngineError(f"{checkpoint} was trained under {recorded} and holds that engine's optimizer state: "
                          f"resume it under {recorded}, not {engine} (or start over with --overwrite_output_dir)")


def enable_fsdp_on_cpu(accelerator: Any, args: Any) -> bool:
    """Switch accelerate's process-wide state from DDP to FSDP when FSDP was requested on CPU processes.

    ``AcceleratorState`` turns an FSDP plugin into ``DistributedType.FSDP`` only for GPU-class process groups
    (``MULTI_GPU``, ``MULTI_XPU``, ...); with gloo on CPUs it stays ``MULTI_CPU`` and the Trainer wraps the model in
    DDP. FSDP2 runs on CPUs with gloo, so the state gets what accelerate gives a GPU run: the distributed type (in
    both shared states, ``PartialState`` and ``AcceleratorState``) and the plugin, with the mixed precision.
    Returns whether it switched."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not getattr(args, "fsdp", None) or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def verify_engine(engine: str, accelerator: Any, wrapped: torch.nn.Module | None = None) -> None:
    """Raise :class:`EngineError` unless the engine in force is ``engine``: the accelerator's distributed type,
    and (after the model was prepared) the class of the wrapped model."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if engine == "fsdp2":
        ok = kind == DistributedType.FSDP and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2
        if ok and wrapped is not None:
            from torch.distributed.fsdp import FSDPModule

            ok = isinstance(wrapped, FSDPModule)
    elif engine.startswith("zero"):
        ok = kind == DistributedType.DEEPSPEED
        if ok and wrapped is not None:
            ok = type(wrapped).__name__ == "DeepSpeedEngine" and wrapped.zero_optimization_stage() == int(engine[4:])
    else:
        return
    if not ok:
        what = type(wrapped).__name__ if wrapped is not None else "not prepared yet"
        hint = " (no process group: launch with torchrun)" if kind == DistributedType.NO else ""
        raise EngineError(f"{engine} was requested but accelerate runs {kind}{hint} (model: {what}); refusing to "
                          "train with another engine")


def is_partitioned(model: torch.nn.Module) -> bool:
    """The model's parameters are shards: FSDP2 ``DTensor`` s or DeepSpeed ZeRO-3 partitions (``ds_id``)."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    if hasattr(param, "ds_id"):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(param, DTensor)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (PEFT wrappers included) whose parameters live on the ``meta`` device: the module tree
    and the buffers, no parameter memory. Taken before an engine shards the model, it is the frame
    :func:`plain_model` fills with a gathered state dict."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                             requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def plain_model(frame: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``frame`` (from :func:`meta_copy`) with the tensors of a full ``state_dict`` as its parameters (assigned,
    not copied); parameters shared in the frame (tied embeddings) stay shared."""
    names: dict[int, list[str]] = {}
    for name, param in frame.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    missing = [group[0] for group in names.values() if not any(name in state_dict for name in group)]
    if missing:
        raise EngineError(f"the gathered state dict lacks {len(missing)} parameters (first: {missing[0]})")
    model = copy.deepcopy(frame)
    model.load_state_dict(state_dict, strict=False, assign=True)
    for group in names.values():  # re-tie: assign gave every name its own tensor
        source = next(name for name in group if name in state_dict)
        value = model.get_parameter(source)
        for name in group:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, value)
    return model


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict of a sharded model (a collective: every rank calls it); the main process gets it on
    the CPU, the others ``None``."""
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state_dict = trainer.accelerator.get_state_dict(model)
    if not trainer.args.should_save:
        return None
    return {name: tensor.detach().cpu() for name, tensor in state_dict.items()}


@contextlib.contextmanager
def building_plain_model() -> Iterator[None]:
    """``with building_plain_model(): ...``: models created inside are whole, not partitioned by DeepSpeed's
    ``zero.Init``.

    While a ZeRO-3 config is active (``TrainingArguments`` with ``--deepspeed`` registers it with transformers),
    transformers creates every model under ``zero.Init``, each parameter partitioned at birth; convret's build
    steps (the summary tokens' rows, PEFT, the ``init/`` checkpoint) read and write whole weights. The model is
    built as under DDP, and DeepSpeed partitions it when the Trainer initialises the engine; until then each
    process holds the whole model in host memory (docs/train.md, "Engines")."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    # transformers keeps the active config as a module-level weak reference (4.57 to 5.25 alike)
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
