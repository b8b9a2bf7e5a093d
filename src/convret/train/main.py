"""``convret train``: train a conversational retriever (CSIT or UniConv) with the Hugging Face Trainer.

    convret train                                  # the embedded default: tiny Qwen2, bundled sample world, CPU
    convret train --config cfg.yaml --max_steps 100 --output_dir runs/x
    torchrun --nproc_per_node 8 -m convret train --config src/convret/resources/configs/chatretriever-qwen-7b.yaml

Flags override the config's fields; every ``transformers.TrainingArguments`` option keeps its name. Outputs in
``OUTPUT_DIR``: ``init/`` (the model before training), ``checkpoint-N/`` (Trainer checkpoints that are also
retriever checkpoints), ``final/``, ``log.jsonl``. See docs/train.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_trainer", "prepare_output_dir", "run", "finalize_training_args",
           "resolve_mixed_precision"]

EXIT_NONFINITE = 3


def _split_config(argv: Sequence[str]) -> tuple[str | None, list[str], bool]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(list(argv))
    return known.config, rest, known.help


def _help() -> str:
    from .arguments import make_parser

    parser = make_parser()
    parser.prog = "convret train"
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML (or JSON) file of field values; flags override them (default: the embedded tiny "
                             "config, src/convret/resources/configs/tiny.yaml)")
    parser.description = (
        "Train a conversational dense retriever (recipes csit = ChatRetriever, uniconv = UniConv) with the Hugging "
        "Face Trainer. --config FILE.yaml sets fields, flags override them (the Trainer's own names: --output_dir, "
        "--max_steps, --save_steps, --logging_steps, --seed, --per_device_train_batch_size, --learning_rate, ...). "
        "No config: the embedded tiny default (src/convret/resources/configs/tiny.yaml). --resume auto (default) "
        "continues from the newest complete checkpoint in output_dir, --resume PATH from that one, --resume none "
        "starts fresh (an error if output_dir holds checkpoints, unless --overwrite_output_dir, which deletes "
        "them first and never resumes).")
    return parser.format_help()


def prepare_output_dir(train_args: Any, is_main: bool) -> str | None:
    """Decide where to resume from (or nothing) and clear the output directory when asked.

    - ``--overwrite_output_dir``: delete ``checkpoint-*``, staging directories, ``init/``, ``final/`` and
      ``log.jsonl``, then start fresh. Never resumes (an explicit ``--resume PATH`` with it is an error) --
      except in a torchrun elastic restart (``TORCHELASTIC_RESTART_COUNT > 0``), where deleting the run's own
      checkpoints would lose it: there it resumes like ``auto``.
    - ``--resume auto`` (the default): the newest complete checkpoint, or a fresh start when there is none.
    - ``--resume PATH``: that checkpoint (it must be complete).
    - ``--resume none``: a fresh start; an error when ``output_dir`` already holds checkpoints.
    """
    from .trainer import LOG_NAME, STAGING_PREFIX, complete_checkpoints, last_complete_checkpoint

    output_dir = Path(train_args.output_dir)
    resume = train_args.resume if train_args.resume is not None else "auto"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if train_args.overwrite_output_dir and not restarted:
        if resume not in ("auto", "none"):
            raise ValueError("--overwrite_output_dir starts over: it cannot be combined with --resume PATH")
        if is_main and output_dir.is_dir():
            for child in output_dir.iterdir():
                if (child.name.startswith(("checkpoint-", STAGING_PREFIX)) or child.name in ("init", "final")) \
                        and child.is_dir():
                    shutil.rmtree(child)
                elif child.name == LOG_NAME:
                    child.unlink()
        return None
    if resume == "none":
        if complete_checkpoints(output_dir):
            raise ValueError(f"{output_dir} already holds checkpoints: pass --resume auto to continue the run, or "
                             "--overwrite_output_dir to delete them and start over")
        return None
    if resume == "auto":
        last = last_complete_checkpoint(output_dir)
        return None if last is None else str(last)
    path = Path(resume)
    if not path.is_dir() or path not in complete_checkpoints(path.parent):
        raise ValueError(f"--resume {resume}: not a complete checkpoint directory (checkpoint-N with "
                         "convret_config.json and trainer_state.json)")
    return str(path)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are trained again)."""
    from .._io import atomic_write

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    with atomic_write(path) as handle:
        handle.write("".join(line + "\n" for line in kept))


def _resume_fingerprint(model_args: Any, data_args: Any, loss_args: Any, examples_given: bool) -> dict[str, Any]:
    from .arguments import CONFIG_DIR
    from .examples import default_train_file
    from .mixture import parse_train_files
    from .resume import resume_fingerprint

    sources = (parse_train_files(data_args.train_files, CONFIG_DIR.parent)
               if data_args.train_files is not None and not examples_given else None)
    default = None if data_args.train_file or examples_given else default_train_file(loss_args.recipe)
    return resume_fingerprint(model_args, data_args, loss_args, sources, default, examples_given)


def _max_len(data_args: Any, num_summary: int, recipe: str) -> int:
    if data_args.max_len is not None:
        return data_args.max_len
    longest = max(data_args.max_session_len + data_args.max_response_len + 2 * num_summary,
                  data_args.max_passage_len + num_summary)
    if recipe == "uniconv":
        longest = max(longest, data_args.max_session_len + data_args.max_passage_len + num_summary)
    return -(-longest // 16) * 16


def build_trainer(model_args, data_args, loss_args, train_args, examples=None, formatter=None, built=None):
    """The :class:`ConvretTrainer` for parsed arguments. ``examples`` / ``formatter`` / ``built`` replace the
    data read from ``train_file``, the :class:`convret.data.SequenceFormatter` and the model (tests)."""
    from transformers import set_seed

    from ..collate import CSITCollator
    from .arguments import CONFIG_DIR
    from .data import TrainingCollator, TrainingDataset
    from .examples import read_examples
    from .mixture import MixtureCollator, MixtureDataset, read_mixture
    from .model import build_model
    from .recipes import make_recipe
    from .trainer import LOG_NAME, ConvretTrainer, JsonlLogCallback

    sources: list[dict[str, Any]] = []
    if examples is None:  # read (and checked) before the model is built: a bad file costs no model load
        examples = (read_mixture(data_args, loss_args, CONFIG_DIR.parent, sources) if data_args.train_files is not None
                    else read_examples(data_args, loss_args, sources))
    set_seed(train_args.seed)
    if built is None:
        built = build_model(model_args, data_args, loss_args)
    model, tokenizer, retriever_config = built
    if formatter is None:
        from ..data import SequenceFormatter
        from ..data.sequences import TRAINING_MEMO_SIZE

        formatter = SequenceFormatter(tokenizer, max_session_len=data_args.max_session_len,
                                      max_passage_len=data_args.max_passage_len,
                                      max_response_len=data_args.max_response_len,
                                      instruction=data_args.instruction,
                                      passage_instruction=data_args.passage_instruction,
                                      memo_size=TRAINING_MEMO_SIZE)
    data_seed = train_args.data_seed if train_args.data_seed is not None else train_args.seed
    collator = TrainingCollator(
        formatter,
        CSITCollator(retriever_config.summary_token_ids, tokenizer.pad_token_id,
                     max_len=_max_len(data_args, len(retriever_config.summary_block()), loss_args.recipe),
                     max_passage_len=data_args.max_passage_len, max_response_len=data_args.max_response_len,
                     summary_on_passages=data_args.summary_on_passages,
                     separator_token_id=retriever_config.separator_token_id
                     if retriever_config.chatretriever_compat else None),
        recipe=loss_args.recipe, num_negatives=data_args.num_negatives)
    if isinstance(examples, MixtureDataset):  # several sources: homogeneous batches, counted per source
        examples.configure(num_negatives=data_args.num_negatives, seed=data_seed, sample=data_args.sample_negatives)
        dataset, collator = examples, MixtureCollator(collator, len(examples.source_names))
    else:
        dataset = TrainingDataset(examples, num_negatives=data_args.num_negatives, seed=data_seed,
                                  sample=data_args.sample_negatives)
    return ConvretTrainer(
        model=model, args=train_args, train_dataset=dataset, data_collator=collator,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(Path(train_args.output_dir) / LOG_NAME, data=sources or None)],
        recipe=make_recipe(loss_args), retriever_config=retriever_config,
        gradcache_chunk_rows=loss_args.gradcache_chunk_rows,
    )


def resolve_mixed_precision(mode: str, train_args: Any) -> str:
    """The autocast dtype the run trains with: ``"bf16"``, ``"fp16"`` or ``"no"``.

    ``--bf16`` / ``--fp16`` (or ``ACCELERATE_MIXED_PRECISION``) win when set; otherwise ``mode`` decides:
    ``bf16`` / ``fp16`` / ``no`` as named, ``auto`` = bf16 on a CUDA GPU that supports it, else no autocast
    (fp32; the CPU included: CPU bf16 autocast is slow on most CPUs, ask for it with ``bf16``)."""
    import torch

    if mode not in ("auto", "bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {mode!r}")
    if train_args.mixed_precision in ("bf16", "fp16"):
        return train_args.mixed_precision
    if mode == "auto":
        on_gpu = torch.cuda.is_available() and not train_args.use_cpu
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return mode


def finalize_training_args(train_args: Any, model_args: Any) -> Any:
    """convret's defaults on top of the Trainer's: the mixed precision of ``model_args.mixed_precision``,
    non-reentrant checkpointing, no column removal.

    ``TrainingArguments`` turns ``bf16`` / ``fp16`` into its ``mixed_precision`` (what the Trainer's Accelerator
    autocasts with) when it is built, so a precision decided here rebuilds the arguments (``dataclasses.replace``
    runs their validation again) rather than setting a flag the Accelerator would never read. Returns the
    arguments to use (a new object when rebuilt)."""
    import dataclasses

    import torch

    precision = resolve_mixed_precision(model_args.mixed_precision, train_args)
    if precision != train_args.mixed_precision:
        changes: dict[str, Any] = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
        if precision != "no" and not torch.cuda.is_available():
            changes["use_cpu"] = True  # TrainingArguments refuses bf16 without a GPU unless told it is the CPU
        train_args = dataclasses.replace(train_args, **changes)
    if train_args.gradient_checkpointing_kwargs is None:
        train_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    train_args.remove_unused_columns = False
    return train_args


def run(model_args, data_args, loss_args, train_args, examples=None, formatter=None, built=None) -> int:
    """Train: prepare the output directory, save ``init/``, train (resuming when asked), save ``final/``."""
    from ..memory import enable_for_training
    from .checkpoint import load_retriever, save_retriever
    from .engines import building_plain_model, check_request, check_resume_engine, is_sharded
    from .trainer import LOG_NAME, NonFiniteLossError

    from .resume import check_resume

    train_args = finalize_training_args(train_args, model_args)
    engine = check_request(train_args, learnable_temperature=loss_args.learnable_temperature)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = prepare_output_dir(train_args, is_main)
    fingerprint = _resume_fingerprint(model_args, data_args, loss_args, examples is not None)
    if resume is not None:  # before the model is built: a refused resume costs no load
        check_resume_engine(resume, engine)
        for note in check_resume(resume, fingerprint, train_args.resume_with_changes):
            if is_main:
                print(f"convret train: {note}", file=sys.stderr)
    trainer = build_trainer(model_args, data_args, loss_args, train_args, examples, formatter, built)
    trainer.resume_fingerprint = fingerprint
    output_dir = Path(train_args.output_dir)
    start_step = 0
    if resume is not None:  # every rank reads it: all of them must agree on whether to train
        start_step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
    # the Trainer resumed at max_steps still runs one more step: a finished run is only loaded and saved again
    finished = resume is not None and 0 < train_args.max_steps <= start_step
    restore_allocator = enable_for_training(train_args.cpu_caching_allocator, train_args.device)
    try:
        if trainer.is_world_process_zero():
            if resume is None and not (output_dir / "init").exists():
                save_retriever(output_dir / "init", trainer.model, trainer.processing_class,
                               trainer.current_retriever_config())
            if resume is not None:
                _truncate_log(output_dir / LOG_NAME, start_step)
                state = "already finished" if finished else "resuming"
                print(f"convret train: {state}: {resume} (step {start_step})", file=sys.stderr)
        start = time.perf_counter()
        try:
            if finished and is_sharded(engine):
                # the engine's state is sharded: the checkpoint's consolidated retriever files are the weights
                if trainer.is_world_process_zero():
                    with building_plain_model():  # not partitioned by an active ZeRO-3 config
                        loaded = load_retriever(resume)
                    save_retriever(output_dir / "final", loaded.model, loaded.tokenizer, loaded.config)
                trainer.state.global_step = start_step
            elif finished:
                trainer._load_from_checkpoint(resume)
                trainer.state.global_step = start_step
            else:
                trainer.train(resume_from_checkpoint=resume)
        except NonFiniteLossError as error:
            print(f"convret train: {error}", file=sys.stderr)
            return EXIT_NONFINITE
        if not (finished and is_sharded(engine)):
            model = trainer.consolidated_model()  # every rank: a gather under FSDP2 / ZeRO-3
            if model is not None:
                save_retriever(output_dir / "final", model, trainer.processing_class,
                               trainer.current_retriever_config())
        if trainer.is_world_process_zero():
            done = trainer.state.global_step
            ran = f"{done - start_step} in this run" if resume is not None else f"{done} steps"
            print(f"convret train: step {done} reached ({ran}, {time.perf_counter() - start:.1f} s); "
                  f"final weights in {output_dir / 'final'}", file=sys.stderr)
            if trainer.source_totals is not None:
                total = max(sum(trainer.source_totals), 1)
                print("convret train: examples per source in this run: " + ", ".join(
                    f"{name} {n} ({n / total:.1%})" for name, n in zip(trainer.train_dataset.source_names,
                                                                        trainer.source_totals)), file=sys.stderr)
        return 0
    finally:
        _shutdown(trainer)
        restore_allocator()


def _shutdown(trainer: Any) -> None:
    """Free DDP and the process group before the interpreter finalises (gloo aborts otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        trainer.model_wrapped = None
        trainer.accelerator.free_memory()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    from .arguments import parse_arguments

    argv = sys.argv[1:] if argv is None else argv
    config, rest, want_help = _split_config(argv)
    if want_help:
        print(_help())
        return 0
    try:
        model_args, data_args, loss_args, train_args = parse_arguments(rest, config)
    except ValueError as error:
        print(f"convret train: {error}", file=sys.stderr)
        return 2
    try:
        return run(model_args, data_args, loss_args, train_args)
    except (ValueError, FileNotFoundError) as error:
        print(f"convret train: {error}", file=sys.stderr)
        return 2
