"""``convret bench trainer-overhead``: a ConvretTrainer step against the bare CSITLoss step, side by side.

Configuration: ``convret bench step``'s model (Qwen2 architecture, hidden 512, intermediate 1408, 4 layers,
8 heads / 2 KV heads, vocabulary 151,936, untied head, LoRA r=16, alpha 32, dropout 0 on q/k/v/o, fp32); per
session one query of 1024 (+3 summary) tokens, 1 + 4 passages of 384 (+3), one LM sequence
(1024 + 3 + 384 + 3); InfoNCE tau 0.01 + 0.2 x LM loss with label smoothing 0.1; rows of 2,048. ``--scale``
shortens every sequence (``--quick``: a quarter).

- bare: what a hand-written loop does per step: ``CSITCollator`` packing, ``CSITLoss`` forward + backward,
  gradient clipping (1.0), AdamW step, zero_grad;
- trainer: one optimizer step of ``ConvretTrainer.train()`` (data loading and the same packing through its
  data collator, ``compute_loss`` with the csit recipe, backward, clipping, AdamW, LR schedule, logging
  bookkeeping), measured between consecutive ``on_step_end`` callbacks.

Both run on separate copies of the same model; the bare step runs inside the Trainer's ``on_step_end``
callback, so the two alternate step by step. Medians over the --reps timed steps after --warmup steps each.
Check: the first step's loss of the two must agree (same model, same batch).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from . import harness as H

NAME = "trainer-overhead"
SUMMARY_LEN, NEGATIVES = 3, 4
ALPHA, TEMPERATURE, LABEL_SMOOTHING, LR = 0.2, 0.01, 0.1, 1e-4
LOSS_RTOL = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=2, help="sessions per step (2, as convret bench step)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="sequence length scale (1.0 = 1024 / 384 / 384; --quick: 0.25)")
    parser.add_argument("--max-len", type=int, default=2048, help="row length of the packing (2048)")
    parser.add_argument("--hidden", type=int, default=512, help="model hidden size (512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (4)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (151936, Qwen2's)")


def apply_presets(args) -> None:
    if args.smoke:
        args.scale, args.max_len, args.hidden, args.layers, args.vocab = 1 / 32, 128, 64, 1, 1024
        args.reps, args.warmup = 1, 1
    elif args.quick:
        args.scale = min(args.scale, 0.25)
        args.reps, args.warmup = min(args.reps, 3), 1


def build_model(args, seed: int = 0):
    import peft
    import transformers

    import convret.hf  # noqa: F401  (registers attn_implementation="convret")

    config = transformers.Qwen2Config(
        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=args.vocab, max_position_embeddings=4096,
        tie_word_embeddings=False, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret", dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    return model


def make_examples(count: int, scale: float, vocab: int, seed: int = 0) -> list:
    from convret.collate import CSITExample

    rng = random.Random(seed)
    session, passage, response = (max(4, int(n * scale)) for n in (1024, 384, 384))

    def text(n):
        return [rng.randrange(1, vocab - SUMMARY_LEN) for _ in range(n)]

    return [CSITExample(session=text(session), positive=text(passage), negatives=[text(passage) for _ in range(NEGATIVES)],
                        response=text(response)) for _ in range(count)]


class _Examples(torch.utils.data.Dataset):
    """A list of examples, indexed as the Trainer's sampler indexes: by ``(epoch, index)``."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        return self.examples[key[1] if isinstance(key, tuple) else key]


class _Identity:
    """The examples are already token ids: the formatter hands them through."""

    def example(self, ex):
        return ex


def measure(args) -> dict[str, Any]:
    from transformers import TrainerCallback

    from convret.collate import CSITCollator
    from convret.csit import CSITLoss
    from convret.train.arguments import ConvretTrainingArguments
    from convret.train.checkpoint import RetrieverConfig
    from convret.train.data import TrainingCollator
    from convret.train.recipes import CSITRecipe
    from convret.train.trainer import ConvretTrainer

    summary_ids = list(range(args.vocab - SUMMARY_LEN, args.vocab))
    total_steps = args.warmup + args.reps
    examples = make_examples(args.sessions * total_steps, args.scale, args.vocab)
    collator = CSITCollator(summary_ids, pad_token_id=0, max_len=args.max_len, pad_to_multiple_of=64)
    trainer_model = build_model(args)
    bare_model = copy.deepcopy(trainer_model)
    bare_loss = CSITLoss(alpha=ALPHA, temperature=TEMPERATURE, label_smoothing=LABEL_SMOOTHING)
    bare_params = [p for p in bare_model.parameters() if p.requires_grad]
    bare_optimizer = torch.optim.AdamW(bare_params, lr=LR, weight_decay=0.0)
    bare_batches = [examples[i * args.sessions:(i + 1) * args.sessions] for i in range(total_steps)]
    times: dict[str, list[float]] = {"trainer": [], "bare": [], "bare_loss": [], "trainer_loss": []}
    bar = H.progress(range(total_steps), "trainer-overhead steps")
    steps = iter(bar)

    def bare_step(step_examples):
        start = time.perf_counter()
        batch = collator(step_examples)
        out = bare_loss(bare_model, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_params, 1.0)
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)
        times["bare"].append((time.perf_counter() - start) * 1e3)
        times["bare_loss"].append(out.loss.item())

    class SideBySide(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            times["trainer"].append((time.perf_counter() - self.mark) * 1e3)
            bare_step(bare_batches[state.global_step - 1])
            next(steps, None)
            self.mark = time.perf_counter()

    with tempfile.TemporaryDirectory() as out_dir:
        train_args = ConvretTrainingArguments(
            output_dir=out_dir, max_steps=total_steps, per_device_train_batch_size=args.sessions, learning_rate=LR,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
            remove_unused_columns=False, dataloader_num_workers=0, seed=0)
        recipe = CSITRecipe(alpha=ALPHA, temperature=TEMPERATURE, label_smoothing=LABEL_SMOOTHING)
        config = RetrieverConfig(summary_tokens=[f"<|emb_{i}|>" for i in range(SUMMARY_LEN)],
                                 summary_token_ids=summary_ids)
        trainer = ConvretTrainer(model=trainer_model, args=train_args, train_dataset=_Examples(examples),
                                 data_collator=TrainingCollator(_Identity(), collator, num_negatives=NEGATIVES),
                                 recipe=recipe, retriever_config=config, callbacks=[SideBySide()])
        trainer.train()
        times["trainer_loss"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]

    timed = slice(args.warmup, None)
    bare_ms, trainer_ms = statistics.median(times["bare"][timed]), statistics.median(times["trainer"][timed])
    first = {"bare": times["bare_loss"][0], "trainer": times["trainer_loss"][0]}
    # the Trainer logs the loss rounded to 4 decimals: compare within that
    loss_error = abs(first["bare"] - first["trainer"]) / max(abs(first["bare"]), 1.0)
    return {"packing": collator(bare_batches[0]).stats, "bare_runs_ms": times["bare"],
            "trainer_runs_ms": times["trainer"], "bare_ms": bare_ms, "trainer_ms": trainer_ms,
            "overhead": trainer_ms / bare_ms - 1.0, "first_loss": first, "first_loss_relative_error": loss_error,
            "passed": bool(loss_error <= LOSS_RTOL)}


def run(args, argv: list[str]) -> int:
    apply_presets(args)
    if args.device != "cpu":
        raise SystemExit("convret bench trainer-overhead: CPU only (it runs with use_cpu=True)")
    payload: dict[str, Any] = {
        "command": H.command_line("convret bench", argv), "environment": H.environment("cpu"),
        "config": {"sessions": args.sessions, "scale": args.scale, "max_len": args.max_len, "hidden": args.hidden,
                   "layers": args.layers, "vocab": args.vocab, "reps": args.reps, "warmup": args.warmup},
        "plots": []}
    payload.update(measure(args))
    payload["environment"]["load_average_after"] = list(os.getloadavg())
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    c = payload["config"]
    after = ", ".join(f"{x:.1f}" for x in payload["environment"]["load_average_after"])
    runs = lambda xs: ", ".join(f"{x / 1e3:.1f}" for x in xs)  # noqa: E731
    first = payload["first_loss"]
    lines = [f"Command: `{payload['command']}`", "",
             H.environment_line(payload["environment"]) + f" (after: {after})", "",
             f"{c['sessions']} sessions per step, sequence scale {c['scale']}, rows of {c['max_len']}, hidden "
             f"{c['hidden']}, {c['layers']} layers, vocabulary {c['vocab']}; packing {payload['packing']}; "
             f"medians of {c['reps']} timed steps after {c['warmup']} warm-up (runs in s, warm-up included).", "",
             H.markdown_table(["step", "median", "runs (s)"], [
                 ["bare CSITLoss step", H.fmt_ms(payload["bare_ms"]), runs(payload["bare_runs_ms"])],
                 ["ConvretTrainer step", H.fmt_ms(payload["trainer_ms"]), runs(payload["trainer_runs_ms"])]]), "",
             f"Trainer overhead: {100 * payload['overhead']:+.1f} % (target: within 10 %). First-step loss: bare "
             f"{first['bare']:.6f}, trainer {first['trainer']:.6f} "
             f"({'pass' if payload['passed'] else 'FAIL'}, relative difference {payload['first_loss_relative_error']:.1e}).",
             ]
    return "\n".join(lines)
