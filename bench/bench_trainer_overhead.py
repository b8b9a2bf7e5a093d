"""The Trainer's own cost: a ConvretTrainer step against the bare CSITLoss step, side by side in one process.

Configuration: the CSIT-step benchmark's (bench/bench_csit_step.py): Qwen2 architecture, hidden 512,
intermediate 1408, 4 layers, 8 heads / 2 KV heads, vocabulary 151,936, untied head, LoRA r=16 (alpha 32,
dropout 0) on q/k/v/o, fp32; per session one query of 1024 (+3 summary) tokens, 1 + 4 passages of 384 (+3), one
LM sequence (1024 + 3 + 384 + 3); InfoNCE tau 0.01 + 0.2 x LM loss with label smoothing 0.1; rows of 2,048.
``--scale 0.25`` shortens every sequence to a quarter (a reduced size, for a quick run).

- bare: what a hand-written loop does per step: ``CSITCollator`` packing, ``CSITLoss`` forward + backward,
  gradient clipping (1.0), AdamW step, zero_grad.
- trainer: one optimizer step of ``ConvretTrainer.train()`` (data loading and the same packing through its
  data collator, ``compute_loss`` with the csit recipe, backward, clipping, AdamW, LR schedule, logging
  bookkeeping), measured between consecutive ``on_step_end`` callbacks.

Both run on separate copies of the same model; the bare step runs inside the Trainer's ``on_step_end`` callback,
so the two alternate step by step. Medians over the timed steps after ``--warmup`` steps each.

    python bench/bench_trainer_overhead.py                 # 2 sessions, full size, 1 warm-up + 4 timed steps
    python bench/bench_trainer_overhead.py --scale 0.25    # reduced sequence lengths
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time

import torch

VOCAB, SUMMARY_LEN, NEGATIVES = 151936, 3, 4
SUMMARY_IDS = list(range(VOCAB - SUMMARY_LEN, VOCAB))
ALPHA, TEMPERATURE, LABEL_SMOOTHING, LR = 0.2, 0.01, 0.1, 1e-4


def build_model(seed: int = 0):
    import peft
    import transformers

    import convret.hf  # noqa: F401

    config = transformers.Qwen2Config(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret", dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    return model


def make_examples(count: int, scale: float, seed: int = 0):
    from convret.collate import CSITExample

    rng = random.Random(seed)
    session, passage, response = int(1024 * scale), int(384 * scale), int(384 * scale)

    def text(n):
        return [rng.randrange(1, VOCAB - SUMMARY_LEN) for _ in range(n)]

    return [CSITExample(session=text(session), positive=text(passage), negatives=[text(passage) for _ in range(NEGATIVES)],
                        response=text(response)) for _ in range(count)]


class _Identity:
    """The examples are already token ids: the formatter hands them through."""

    def example(self, ex):
        return ex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2, help="sessions per step (the CSIT benchmark's 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps of each, not timed")
    parser.add_argument("--scale", type=float, default=1.0, help="sequence length scale (1.0 = 1024/384/384)")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from convret.collate import CSITCollator
    from convret.csit import CSITLoss
    from convret.train.arguments import ConvretTrainingArguments
    from convret.train.checkpoint import RetrieverConfig
    from convret.train.data import TrainingCollator
    from convret.train.recipes import CSITRecipe
    from convret.train.trainer import ConvretTrainer

    torch.manual_seed(0)
    total_steps = args.warmup + args.steps
    examples = make_examples(args.sessions * total_steps, args.scale)
    collator = CSITCollator(SUMMARY_IDS, pad_token_id=0, max_len=args.max_len, pad_to_multiple_of=64)
    trainer_model = build_model()
    bare_model = copy.deepcopy(trainer_model)
    bare_loss = CSITLoss(alpha=ALPHA, temperature=TEMPERATURE, label_smoothing=LABEL_SMOOTHING)
    bare_params = [p for p in bare_model.parameters() if p.requires_grad]
    bare_optimizer = torch.optim.AdamW(bare_params, lr=LR, weight_decay=0.0)
    bare_batches = [examples[i * args.sessions:(i + 1) * args.sessions] for i in range(total_steps)]
    times = {"trainer": [], "bare": [], "bare_loss": [], "trainer_loss": []}

    def bare_step(step_examples):
        start = time.perf_counter()
        batch = collator(step_examples)
        out = bare_loss(bare_model, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_params, 1.0)
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)
        times["bare"].append(time.perf_counter() - start)
        times["bare_loss"].append(out.loss.item())

    class SideBySide(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            times["trainer"].append(time.perf_counter() - self.mark)
            bare_step(bare_batches[state.global_step - 1])
            self.mark = time.perf_counter()

    with tempfile.TemporaryDirectory() as out_dir:
        train_args = ConvretTrainingArguments(
            output_dir=out_dir, max_steps=total_steps, per_device_train_batch_size=args.sessions, learning_rate=LR,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
            remove_unused_columns=False, dataloader_num_workers=0, seed=0)
        recipe = CSITRecipe(alpha=ALPHA, temperature=TEMPERATURE, label_smoothing=LABEL_SMOOTHING)
        config = RetrieverConfig(summary_tokens=[f"<|emb_{i}|>" for i in range(3)], summary_token_ids=SUMMARY_IDS)
        trainer = ConvretTrainer(model=trainer_model, args=train_args, train_dataset=examples,
                                 data_collator=TrainingCollator(_Identity(), collator, num_negatives=NEGATIVES),
                                 recipe=recipe, retriever_config=config, callbacks=[SideBySide()])
        trainer.train()
        times["trainer_loss"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]

    timed = slice(args.warmup, None)
    result = {
        "sessions": args.sessions, "scale": args.scale, "timed_steps": args.steps,
        "packing": collator(bare_batches[0]).stats,
        "bare_s": [round(t, 3) for t in times["bare"]], "trainer_s": [round(t, 3) for t in times["trainer"]],
        "bare_median_s": statistics.median(times["bare"][timed]),
        "trainer_median_s": statistics.median(times["trainer"][timed]),
        "first_loss": {"bare": times["bare_loss"][0], "trainer": times["trainer_loss"][0]},
    }
    result["overhead"] = result["trainer_median_s"] / result["bare_median_s"] - 1.0
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"sessions {args.sessions}, scale {args.scale}, packing {result['packing']}")
    print(f"bare CSITLoss step : median {result['bare_median_s']:.3f} s  (runs {result['bare_s']})")
    print(f"ConvretTrainer step: median {result['trainer_median_s']:.3f} s  (runs {result['trainer_s']})")
    print(f"Trainer overhead   : {100 * result['overhead']:+.1f} %   (target: within 10 %)")
    print(f"first-step loss: bare {result['first_loss']['bare']:.6f}, trainer {result['first_loss']['trainer']:.6f}")


if __name__ == "__main__":
    main()
