"""``convret bench step --engines``: each training engine's memory per rank at tiny size, measured beside the
arithmetic of :mod:`convret.train.memory_plan`.

For every engine (DDP, FSDP2, ZeRO-2, ZeRO-3) two CPU processes (torchrun, gloo) train a tiny Qwen2 (hidden
256, 4 layers, vocabulary 8,192, about 7.9 M parameters, fp32, full fine-tuning) for 2 steps through
``ConvretTrainer`` on the bundled sample world. Each rank reports, at the end of step 2:

- its parameters: the local shard of every parameter (an FSDP2 ``DTensor``'s local tensor, a ZeRO-3
  partition, the whole tensor otherwise);
- its optimizer states: every tensor in the optimizer's state (DeepSpeed's inner optimizer over its flat
  partitions included);
- all tensors alive in the process (unique storages): parameters, optimizer states, gradients and every
  buffer the engine keeps (DeepSpeed's flat fp32 partitions and gradient partitions, ...);
- its peak resident memory during the two steps above its resident memory when training began (``VmHWM``
  after a reset), activations and transient gathers included.

The arithmetic's parameters / gradients / optimizer states per rank are printed beside them (fp32: the CPU
runs without bf16).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ENGINE_NAMES", "measure", "format_table", "TINY"]

ENGINE_NAMES = ("ddp", "fsdp2", "zero2", "zero3")
TINY = {"model_type": "qwen2", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 512, "tie_word_embeddings": False}
WORLD = 2


def _engine_flags(engine: str, directory: Path) -> list[str]:
    if engine == "ddp":
        return []
    if engine == "fsdp2":
        return ["--fsdp", "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})]
    stage = int(engine[-1])
    # bucket sizes "auto": transformers sizes them from the hidden size, as the bundled 7B configs do (DeepSpeed's
    # own defaults are 5e8-element buckets, about 2 GiB of fp32 per rank whatever the model)
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    path = directory / f"ds-{engine}.json"
    path.write_text(json.dumps({"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                                "gradient_clipping": "auto"}))
    return ["--deepspeed", str(path)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(engines: list[str], timeout_s: float = 900) -> list[dict[str, Any]]:
    """One torchrun of 2 processes per engine; a record per engine (``status`` ok / error, per-rank figures)."""
    from ..train.memory_plan import model_state

    records = []
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix=f"convret-bench-{engine}-") as tmp:
            directory = Path(tmp)
            (directory / "model.json").write_text(json.dumps(TINY))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
                   str(_free_port()), "-m", "convret.bench.engine_memory", "--child", str(directory), "--",
                   "--model_config", str(directory / "model.json"), "--output_dir", str(directory / "out"),
                   "--max_steps", "2", "--save_steps", "1000", "--per_device_train_batch_size", "8",
                   "--ddp_backend", "gloo", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
                   "--logging_steps", "1", "--cpu_caching_allocator", "false", *_engine_flags(engine, directory)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
                failed = result.returncode != 0
                error = result.stderr[-3000:] if failed else ""
            except subprocess.TimeoutExpired:
                failed, error = True, f"timed out after {timeout_s} s"
            ranks = [json.loads(p.read_text()) for p in sorted(directory.glob("rank-*.json"))]
        if failed or len(ranks) != WORLD:
            records.append({"engine": engine, "status": "error", "error": error or "no per-rank report"})
            continue
        params, trainable = ranks[0]["total_params"], ranks[0]["trainable_params"]
        predicted = model_state(engine, params, trainable, WORLD, bf16=False)
        records.append({"engine": engine, "status": "ok", "world": WORLD, "params": params, "trainable": trainable,
                        "ranks": ranks, "predicted": {"parameters": predicted.parameters,
                                                      "gradients": predicted.gradients,
                                                      "optimizer": predicted.optimizer,
                                                      "model_state": predicted.model_state}})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    from .harness import markdown_table

    def mib(value: float) -> str:
        return f"{value / 2**20:.1f}"

    rows = []
    for record in records:
        if record["status"] != "ok":
            rows.append([record["engine"], "error", "", "", "", "", "", ""])
            continue
        pred = record["predicted"]
        worst = max(record["ranks"], key=lambda r: r["tensors_bytes"])
        rows.append([record["engine"],
                     f"{mib(worst['param_bytes'])} / {mib(pred['parameters'])}",
                     f"{mib(worst['optimizer_bytes'])} / {mib(pred['optimizer'])}",
                     mib(pred["gradients"]),
                     f"{mib(worst['tensors_bytes'])} / {mib(pred['model_state'])}",
                     mib(worst["peak_above_start_bytes"]),
                     f"{record['params'] / 1e6:.2f} M"])
    header = ["engine", "parameters MiB (measured / arithmetic)", "optimizer states MiB (measured / arithmetic)",
              "gradients MiB (arithmetic)", "all tensors alive MiB (measured) / model state (arithmetic)",
              "peak RSS above start of training MiB", "model"]
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------ the child
def _local_bytes(tensor) -> int:
    if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 parameter: its partition
        tensor = tensor.ds_tensor
    if hasattr(tensor, "to_local"):  # an FSDP2 DTensor: the local shard
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def _optimizer_state_bytes(optimizer) -> int:
    seen: set[int] = set()
    total = 0
    while optimizer is not None:  # AcceleratedOptimizer -> DeepSpeed's ZeRO optimizer -> the torch optimizer
        for state in getattr(optimizer, "state", {}).values():
            for value in state.values() if isinstance(state, dict) else ():
                if hasattr(value, "numel") and value.numel() > 1 and id(value) not in seen:
                    seen.add(id(value))
                    total += _local_bytes(value)
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not optimizer else None
    return total


def _all_tensor_bytes() -> int:
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            if hasattr(obj, "to_local"):
                continue  # a DTensor wraps its local tensor, counted on its own
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
    return sum(storages.values())


def _child(directory: Path, flags: list[str]) -> int:
    from transformers import TrainerCallback

    from ..train.arguments import parse_arguments
    from ..train.engines import check_request
    from ..train.main import _shutdown, build_trainer, finalize_training_args
    from . import harness as H

    try:  # DeepSpeed's CPU shared-memory all-reduce op is for inference; skip its JIT build (minutes)
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass
    model_args, data_args, loss_args, train_args = parse_arguments(flags)
    train_args = finalize_training_args(train_args, model_args)
    check_request(train_args)
    trainer = build_trainer(model_args, data_args, loss_args, train_args)
    total = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    class Census(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            H.reset_peak_rss()
            self.start = H.rss_bytes()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != 2:
                return
            gc.collect()
            report = {"rank": args.process_index, "total_params": total, "trainable_params": trainable,
                      "param_bytes": sum(_local_bytes(p) for p in trainer.model.parameters()),
                      "optimizer_bytes": _optimizer_state_bytes(trainer.optimizer),
                      "tensors_bytes": _all_tensor_bytes(),
                      "peak_above_start_bytes": H.peak_rss_bytes() - self.start,
                      "wrapped": type(trainer.model_wrapped).__name__}
            (directory / f"rank-{args.process_index}.json").write_text(json.dumps(report))

    trainer.add_callback(Census())
    try:
        trainer.train()
    finally:
        _shutdown(trainer)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m convret.bench.engine_memory")
    parser.add_argument("--child", required=True, help="directory for the per-rank reports")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    return _child(Path(args.child), argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
