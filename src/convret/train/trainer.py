"""``ConvretTrainer``: ``transformers.Trainer`` with the one-pass CSIT / UniConv step.

What the subclass changes (everything else, DDP / FSDP / DeepSpeed under torchrun, gradient accumulation,
schedules, clipping, ``report_to``, checkpoint rotation, optimizer / scheduler / RNG state and the skipping of
consumed batches on resume, comes from the Trainer as it is):

- :meth:`compute_loss` runs a :class:`convret.train.recipes.Recipe` on the packed batch (under the
  accelerator's autocast), records the loss parts, and stops on a NaN / inf loss;
- :meth:`training_step` runs GradCache instead when ``gradcache_chunk_rows`` is set;
- :meth:`_get_train_sampler`: a shuffle that is a function of (seed, epoch), so that resume replays it; it yields
  ``(epoch, index)`` so that the dataset samples that epoch's negatives;
- checkpoints: every ``checkpoint-N`` is also a retriever checkpoint (``convret_config.json``, tokenizer with
  its summary tokens, safetensors weights or adapter) and is written into a hidden staging directory, flushed
  and renamed (:meth:`_save_checkpoint`, :meth:`_save`);
- :meth:`create_optimizer` adds a learnable temperature; :meth:`log` adds the loss parts, tokens/s and the
  packing fill to the Trainer's log;
- engines (:mod:`convret.train.engines`): FSDP2 also on CPU processes, the engine in force checked against the
  one requested (:meth:`create_accelerator_and_postprocess`, first :meth:`training_step`), GradCache through
  DeepSpeed's own backward, consolidated retriever files under FSDP2 / ZeRO-3 (:meth:`save_model`,
  :meth:`consolidated_model`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._io import fsync_tree
from .checkpoint import CONFIG_NAME, RetrieverConfig, is_checkpoint, write_retriever
from .data import EpochShuffleSampler
from .engines import (enable_fsdp_on_cpu, gathered_state_dict, is_partitioned, is_sharded, meta_copy, plain_model,
                      requested_engine, verify_engine)
from .gradcache import gradcache_step
from .mixture import SOURCE_COUNTS_KEY
from .recipes import Recipe
from .resume import write_resume_fingerprint

__all__ = ["ConvretTrainer", "NonFiniteLossError", "JsonlLogCallback", "ProgressBarCallback",
           "complete_checkpoints", "last_complete_checkpoint", "LOG_NAME", "STAGING_PREFIX"]

LOG_NAME = "log.jsonl"
STAGING_PREFIX = ".staging-"
SOURCE_LOG_PREFIX = "examples/"  # log keys of a mixture's examples per source
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; nothing of that step was applied.

    Attributes:
        step: the optimizer step that produced it (the global step before it).
        terms: the loss parts of that micro-batch.
        last_checkpoint: the newest complete checkpoint (untouched), or ``None``.
    """

    def __init__(self, step: int, terms: dict[str, float], last_checkpoint: str | None):
        self.step, self.terms, self.last_checkpoint = step, terms, last_checkpoint
        parts = ", ".join(f"{k}={v}" for k, v in terms.items())
        where = last_checkpoint or "none (no checkpoint was written yet)"
        super().__init__(f"non-finite loss at step {step} ({parts}); training stopped. Last good checkpoint: {where}")


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir`` that are complete (a retriever config and the Trainer
    state inside), oldest step first. Staging directories of interrupted saves are never listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and is_checkpoint(child) and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ConvretTrainer(Trainer):
    """The Hugging Face Trainer training a conversational retriever with a convret recipe.

    Args:
        recipe: the :class:`Recipe` (``make_recipe(loss_args)``).
        retriever_config: what goes into every checkpoint's ``convret_config.json``.
        gradcache_chunk_rows: run each batch as GradCache in chunks of this many packed rows (0: off).
        **kwargs: ``transformers.Trainer`` arguments (``model``, ``args``, ``train_dataset``,
            ``data_collator``, ``processing_class`` = the tokenizer, ``callbacks``, ...).
    """

    def __init__(self, *args: Any, recipe: Recipe, retriever_config: RetrieverConfig,
                 gradcache_chunk_rows: int = 0, **kwargs: Any):
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.engine = requested_engine(args_)
        # a parameter-free copy of the model before the engine shards it: the frame of consolidated saves
        model = kwargs.get("model", args[0] if args else None)
        self._frame = meta_copy(model) if is_sharded(self.engine) else None
        self._engine_verified = False
        super().__init__(*args, **kwargs)
        self.recipe = recipe.to(self.args.device)
        self.retriever_config = retriever_config
        self.gradcache_chunk_rows = int(gradcache_chunk_rows)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self._staging_dir: str | None = None
        self.source_totals: list[int] | None = None  # a mixture's examples per source in this run
        self.resume_fingerprint: dict[str, Any] | None = None  # written into every checkpoint (train/resume.py)
        self._reset_log_sums()
        if self.args.disable_tqdm is False:
            self.remove_callback(ProgressCallback)
            self.add_callback(ProgressBarCallback())

    # ------------------------------------------------------------------ engine
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True
        verify_engine(self.engine, self.accelerator)

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if hasattr(dataset, "source_names"):  # a MixtureDataset: blocks of one batch from one source each
            return dataset.sampler(seed, self._train_batch_size)
        return EpochShuffleSampler(len(dataset), seed, shuffle=self.args.train_sampling_strategy != "sequential")

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = [p for p in self.recipe.parameters() if p.requires_grad]
        if extra and not any(p is q for group in optimizer.param_groups for p in extra for q in group["params"]):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs["batch"].to(self.args.device)
        with self.accelerator.autocast():
            out = self.recipe(model, batch)
        self._record(out.terms, out.loss, batch)
        return (out.loss, out.terms) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._engine_verified:  # the model is prepared by now: the wrapper must be the engine asked for
            verify_engine(self.engine, self.accelerator, model)
            self._engine_verified = True
        if not self.gradcache_chunk_rows:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.recipe.average_gradients()
            return loss
        model.train()
        batch = inputs["batch"].to(self.args.device)
        scale = 1.0 / self.current_gradient_accumulation_steps
        no_sync = (lambda: self.accelerator.no_sync(model)) if _world()[0] > 1 else None
        backward = self.accelerator.backward
        if self.is_deepspeed_enabled:
            backward, no_sync = self._deepspeed_gradcache_hooks()
        with self.accelerator.autocast():
            out = gradcache_step(model, self.recipe, batch, self.gradcache_chunk_rows,
                                 backward=backward, no_sync=no_sync, loss_scale=scale)
        self._record(out.terms, out.loss, batch)  # raises before the optimizer step applies anything
        self.recipe.average_gradients()
        return out.loss.detach() * scale

    def _deepspeed_gradcache_hooks(self):
        """GradCache's ``backward`` and ``no_sync`` under DeepSpeed.

        ``accelerator.backward`` would run DeepSpeed's optimizer step after every chunk (the engine steps inside
        ``backward`` at each accumulation boundary). Here the chunks of a batch are accumulation micro-steps to
        DeepSpeed: the chunks GradCache runs under ``no_sync`` (all but the last) are not a boundary; the last one
        is the boundary the Trainer's own accumulation says (``sync_gradients``), and only there the engine steps.
        ``scale_wrt_gas`` is off as in the Trainer's step: GradCache's ``loss_scale`` divides by the accumulation
        steps already; DeepSpeed's loss scaler (fp16) still applies once to each chunk."""
        wrapper = self.accelerator.deepspeed_engine_wrapped
        inside = [False]

        @contextlib.contextmanager
        def no_sync():
            inside[0] = True
            try:
                yield
            finally:
                inside[0] = False

        def backward(tensor: torch.Tensor) -> None:
            wrapper.backward(tensor, sync_gradients=not inside[0] and self.accelerator.sync_gradients,
                             scale_wrt_gas=False)

        return backward, no_sync

    def _record(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, batch) -> None:
        """Accumulate the loss parts (reduced over ranks) for the next log; raise on a non-finite loss before
        anything is back-propagated. Every rank reaches the same verdict (the values are all-reduced)."""
        names = ["loss", *terms]
        values = torch.stack([loss.detach().float().reshape(()), *[t.detach().float().reshape(()) for t in
                                                                   terms.values()]])
        stats = torch.tensor([float(batch.stats.get("real_tokens", 0)), float(batch.stats.get("fill", 0.0))],
                             device=values.device)
        packed = torch.cat([values, stats])
        world_size, _ = _world()
        if world_size > 1:
            dist.all_reduce(packed)
            packed[: len(names)] /= world_size
            packed[-1] /= world_size
        packed = packed.cpu()
        if self.args.stop_on_nonfinite and not bool(torch.isfinite(packed[: len(names)]).all()):
            last = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(self.state.global_step + 1,
                                     {n: float(v) for n, v in zip(names, packed[: len(names)])},
                                     None if last is None else str(last))
        for name, value in zip(names, packed[: len(names)].tolist()):
            self._log_sums[name] = self._log_sums.get(name, 0.0) + value
        self._log_count += 1
        self._log_tokens += float(packed[-2])
        self._log_fill += float(packed[-1])
        self._record_sources(batch)

    def _record_sources(self, batch) -> None:
        """Examples per source of a mixture (summed over ranks): for the next log and the run's totals."""
        counts = batch.stats.get(SOURCE_COUNTS_KEY)
        if counts is None:
            return
        counts = torch.tensor(counts, dtype=torch.float32, device=self.args.device)
        if _world()[0] > 1:
            dist.all_reduce(counts)
        counts = [int(c) for c in counts.cpu().round().tolist()]
        self._log_sources = [a + b for a, b in zip(self._log_sources or [0] * len(counts), counts)]
        self.source_totals = [a + b for a, b in zip(self.source_totals or [0] * len(counts), counts)]

    def _reset_log_sums(self) -> None:
        self._log_sums: dict[str, float] = {}
        self._log_count = 0
        self._log_tokens = 0.0
        self._log_fill = 0.0
        self._log_sources: list[int] | None = None
        self._log_time = time.perf_counter()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_count:
            for name, total in self._log_sums.items():
                if name != "loss":
                    logs[name] = total / self._log_count
            elapsed = max(time.perf_counter() - self._log_time, 1e-9)
            logs["tokens_per_s"] = self._log_tokens / elapsed
            logs["fill"] = self._log_fill / self._log_count
            logs["temperature"] = self.recipe.temperature_value()
            if self._log_sources is not None:  # examples per source since the last log, "examples/NAME"
                for name, count in zip(self.train_dataset.source_names, self._log_sources):
                    logs[f"{SOURCE_LOG_PREFIX}{name}"] = count
            self._reset_log_sums()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def current_retriever_config(self) -> RetrieverConfig:
        config = RetrieverConfig(**{**self.retriever_config.__dict__})
        config.temperature = self.recipe.temperature_value()
        config.extra = {**config.extra, "log_temperature": float(self.recipe.log_temperature.detach()),
                        "global_step": int(self.state.global_step), "engine": self.engine}
        return config

    def _get_output_dir(self, trial) -> str:
        if self._staging_dir is not None:
            return self._staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into ``OUTPUT_DIR/.staging-N/checkpoint-N``, flushed, then renamed
        to ``OUTPUT_DIR/checkpoint-N``; rotation (``save_total_limit``) runs on complete checkpoints only."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{self.state.global_step}"
        world_size, _ = _world()
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        if world_size > 1:
            dist.barrier()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if world_size > 1:
            dist.barrier()  # every rank's RNG state is in
        if self.args.should_save:
            if self.resume_fingerprint is not None:
                write_resume_fingerprint(staging / name, self.resume_fingerprint)
            fsync_tree(staging)
            final = run_dir / name
            if final.exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(final)
            os.replace(staging / name, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(run_dir)
        if world_size > 1:
            dist.barrier()

    def _rotate(self, run_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        for old in complete_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The retriever files of a checkpoint. FSDP2 / ZeRO-3: the full weights gathered to the main process
        (every rank takes part) and written from a plain copy of the model; ZeRO-1/2 hold the whole module on
        every rank and write it as DDP does. The engine's own (sharded) training state is written by the Trainer's
        ``_save_optimizer_and_scheduler`` beside it."""
        if self.is_engine_sharded():
            output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
            model = self.consolidated_model()
            if model is not None:
                self._write(output_dir, model)
        elif self.is_deepspeed_enabled:
            self._save(output_dir)
        else:
            super().save_model(output_dir, _internal_call)

    def is_engine_sharded(self) -> bool:
        """The model's parameters are sharded over the ranks now (FSDP2 / ZeRO-3 after the Trainer prepared it)."""
        return is_sharded(self.engine) and is_partitioned(self.model)

    def consolidated_model(self) -> torch.nn.Module | None:
        """A plain (unsharded, CPU) copy of the model with the current weights, on the main process (``None`` on the
        others). A collective under FSDP2 / ZeRO-3: every rank must call it; elsewhere the unwrapped model."""
        if not self.is_engine_sharded():
            return self.accelerator.unwrap_model(self.model) if self.args.should_save else None
        state_dict = gathered_state_dict(self)
        return None if state_dict is None else plain_model(self._frame, state_dict)

    def _write(self, output_dir: Path, model: torch.nn.Module, state_dict: dict | None = None) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_retriever(output_dir, model, self.processing_class, self.current_retriever_config(),
                        state_dict=state_dict)
        torch.save(self.args, output_dir / "training_args.bin")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights (safetensors: the full model or the PEFT adapter), the tokenizer and convret_config.json: a
        retriever checkpoint. Atomicity comes from the caller (:meth:`_save_checkpoint`, ``save_retriever``)."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        self._write(output_dir, self.accelerator.unwrap_model(self.model, keep_torch_compile=False), state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        config = RetrieverConfig.from_file(Path(resume_from_checkpoint) / CONFIG_NAME)
        log_tau = config.extra.get("log_temperature")
        if log_tau is not None:
            with torch.no_grad():
                self.recipe.log_temperature.fill_(float(log_tau))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlLogCallback(TrainerCallback):
    """Appends every training log as one JSON object per line to ``OUTPUT_DIR/log.jsonl``: ``step``, ``loss``,
    ``contrastive``, ``generation`` (``cii`` for UniConv), ``lr``, ``grad_norm``, ``tokens_per_s``, ``fill``,
    ``temperature``, ``epoch``. The first line a run writes also holds ``data``: what it trains on (the
    training files, their format and example counts), when given. Main process only; each line is flushed and
    fsynced."""

    KEYS = {"learning_rate": "lr"}

    def __init__(self, path: str | os.PathLike, data: list[dict[str, Any]] | None = None):
        self.path = Path(path)
        self.data = data

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record: dict[str, Any] = {"step": state.global_step}
        if self.data:
            record["data"], self.data = self.data, None
        for key, value in logs.items():
            if key == "total_flos":
                continue
            key = self.KEYS.get(key, key)
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            record[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class ProgressBarCallback(TrainerCallback):
    """A tqdm bar over the optimizer steps showing the latest loss parts and tokens/s."""

    SHOWN = (("loss", "loss"), ("contrastive", "con"), ("generation", "gen"), ("cii", "cii"),
             ("tokens_per_s", "tok/s"))

    def __init__(self):
        self.bar = None
        self.current = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
            self.current = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.current)
            self.current = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            shown = {label: logs[key] for key, label in self.SHOWN if key in logs}
            sources = {k.removeprefix(SOURCE_LOG_PREFIX): v for k, v in logs.items()
                       if k.startswith(SOURCE_LOG_PREFIX)}
            if sources:
                shown["examples"] = " ".join(f"{k}:{v}" for k, v in sources.items())
            self.bar.set_postfix({k: v if isinstance(v, str) else (f"{v:.0f}" if k == "tok/s" else f"{v:.4g}")
                                  for k, v in shown.items()},
                                 refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
