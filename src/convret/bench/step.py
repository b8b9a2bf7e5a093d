"""``convret bench step``: one CSIT training step, the reference approach against convret, with an ablation.

Model: a Qwen2 decoder built from a config (no weights are downloaded): hidden 512, intermediate 1408,
4 layers, 8 heads / 2 KV heads, vocabulary 151,936, untied LM head, LoRA r = 16 on q/k/v/o, fp32. Per
session: one query (session 1024 + t = 3 summary tokens), 1 positive + 4 hard negatives of 384 (+ t), one LM
sequence [session, summary, response 384, summary]. Loss: InfoNCE (tau 0.01, L2-normalised, in-batch and
hard negatives) + 0.2 x label-smoothed (0.1) LM loss on the response tokens.

The ablation switches convret's parts on one at a time, each row adding one to the row above, so that the
difference between two neighbouring rows is what that part buys:

1. reference: what the released CSIT code does: four forwards (sessions, positives, negatives, LM
   sequences), eager attention, a dense additive [B, 1, L, L] session mask, full-vocabulary logits on every
   forward (the embedding passes too), ``F.cross_entropy`` on the full logits, glibc malloc;
2. + session kernel: ``attn_implementation="convret"`` (session_attention for the LM sequences, causal SDPA
   for the embedding passes), still four forwards;
3. + one-pass packing: ``CSITCollator`` packs everything into rows of --max-len, one forward;
4. + no LM head on embedding samples: the LM head runs on the labelled response tokens only (the rows above
   compute logits for every token, the embedding samples' included);
5. + chunked LM loss: ``convret.linear_cross_entropy`` never holds the [tokens, V] logits (= ``CSITLoss``);
6. + caching allocator: ``convret.enable_cpu_caching_allocator()`` (CPU only) = convret as shipped.

Every row computes the same loss from the same weights and batch: the check compares each row's loss and
LoRA gradients with the reference's. Time: all rows side by side in one process, alternating, medians after
one warm-up step each (the allocator row turns the cache on for its own step and off after it). Peak memory:
a fresh process per row, ``VmHWM`` above the built model.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import harness as H

NAME = "step"
ALPHA, TEMPERATURE, LABEL_SMOOTHING = 0.2, 0.01, 0.1


@dataclass(frozen=True)
class Config:
    """One row of the ablation."""

    name: str
    kernel: bool  # attn_implementation="convret" instead of eager + dense mask
    one_pass: bool  # CSITCollator packing, one forward
    head_on_labelled_only: bool  # LM head on the labelled response tokens only
    chunked: bool  # linear_cross_entropy instead of F.cross_entropy on materialised logits
    allocator: bool  # convret.enable_cpu_caching_allocator()


ABLATION = (
    Config("reference (eager + dense mask, 4 forwards, full logits)", False, False, False, False, False),
    Config("+ session kernel", True, False, False, False, False),
    Config("+ one-pass packing", True, True, False, False, False),
    Config("+ no LM head on embedding samples", True, True, True, False, False),
    Config("+ chunked LM loss", True, True, True, True, False),
    Config("+ caching allocator (= convret)", True, True, True, True, True),
)


# ------------------------------------------------------------------------------------------ model, data
def build_model(shape: dict, seed: int = 0):
    import peft
    import transformers

    import convret.hf  # noqa: F401  (registers attn_implementation="convret")

    config = transformers.Qwen2Config(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=8192, tie_word_embeddings=False, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora)
    for name, param in model.named_parameters():  # LoRA B starts at zero: make it non-zero so grads are real
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    return model


def make_examples(shape: dict, seed: int = 0):
    from convret.collate import CSITExample

    rng = random.Random(seed)
    vocab, t = shape["vocab"], shape["summary"]

    def text(n):
        return [rng.randrange(1, vocab - t) for _ in range(n)]

    return [CSITExample(session=text(shape["session"]), positive=text(shape["passage"]),
                        negatives=[text(shape["passage"]) for _ in range(shape["negatives"])],
                        response=text(shape["response"]))
            for _ in range(shape["sessions"])]


def summary_ids(shape: dict) -> list[int]:
    return list(range(shape["vocab"] - shape["summary"], shape["vocab"]))


# --------------------------------------------------------------------------------------------- the step
def step(model, examples, shape: dict, config: Config) -> float:
    """One forward + backward under ``config``; returns the loss (gradients left in the model)."""
    from convret import SessionLayout, info_nce, linear_cross_entropy
    from convret.baselines import additive_mask
    from convret.collate import CSITCollator, pool_hidden
    from convret.csit import decoder_of

    model.set_attn_implementation("convret" if config.kernel else "eager")
    decoder = decoder_of(model)
    head = model.get_output_embeddings()
    ids_sum = summary_ids(shape)
    group = 1 + shape["negatives"]

    def lm_loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = F.pad(labels[..., 1:], (0, 1), value=-100)  # HF shift: position t predicts labels[t + 1]
        if config.chunked:
            return linear_cross_entropy(hidden, head.weight, labels, label_smoothing=LABEL_SMOOTHING)
        if config.head_on_labelled_only:
            keep = labels != -100
            return F.cross_entropy(head(hidden[keep]), labels[keep], label_smoothing=LABEL_SMOOTHING)
        return F.cross_entropy(head(hidden).flatten(0, -2), labels.flatten(), label_smoothing=LABEL_SMOOTHING)

    if config.one_pass:
        batch = CSITCollator(ids_sum, pad_token_id=0, max_len=shape["max_len"], pad_to_multiple_of=64)(examples)
        if config.kernel:
            hidden = decoder(**batch.model_inputs()).last_hidden_state
        else:
            hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             attention_mask=additive_mask(batch.layout, torch.float32), use_cache=False).last_hidden_state
        if not config.head_on_labelled_only:
            head(hidden)  # the logits of every token, embedding samples included, as a full-logit pass has them
        queries = F.normalize(pool_hidden(hidden, batch.query_positions), dim=-1)
        passages = F.normalize(pool_hidden(hidden, batch.passage_positions), dim=-1)
        generation = lm_loss(hidden, batch.labels)
    else:
        def embed(seqs):  # every sequence of one pass has the same length: no padding
            ids = torch.tensor(seqs)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            if not config.head_on_labelled_only:
                head(hidden)  # the released code calls the CausalLM: logits computed, then unused
            return F.normalize(hidden[:, -1], dim=-1)

        queries = embed([list(e.session) + ids_sum for e in examples])
        positives = embed([list(e.positive) + ids_sum for e in examples])
        negatives = embed([list(n) + ids_sum for e in examples for n in e.negatives])
        passages = torch.cat([positives.unsqueeze(1), negatives.view(len(examples), group - 1, -1)], 1).flatten(0, 1)
        t, session_len, response_len = shape["summary"], shape["session"], shape["response"]
        ids = torch.tensor([list(e.session) + ids_sum + list(e.response) + ids_sum for e in examples])
        layout = SessionLayout.from_segments([[(session_len, t, response_len + t)]] * len(examples), ids.shape[1])
        labels = torch.full_like(ids, -100)
        start = session_len + t
        labels[:, start:start + response_len] = ids[:, start:start + response_len]
        if config.kernel:
            hidden = decoder(input_ids=ids, session_layout=layout, position_ids=layout.position_ids(),
                             use_cache=False).last_hidden_state
        else:
            hidden = decoder(input_ids=ids, attention_mask=additive_mask(layout, torch.float32),
                             position_ids=layout.position_ids(), use_cache=False).last_hidden_state
        generation = lm_loss(hidden, labels)
    if config.chunked:
        contrastive = info_nce(queries, passages, TEMPERATURE, group_size=group)
    else:  # the reference's naive InfoNCE on the [Q, P] logits
        contrastive = F.cross_entropy(queries @ passages.T / TEMPERATURE, torch.arange(len(queries)) * group)
    loss = contrastive + ALPHA * generation
    loss.backward()
    return float(loss)


def lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None])


def zero_grad(model) -> None:
    model.zero_grad(set_to_none=True)


def _set_allocator(on: bool) -> None:
    import convret
    from convret.memory import disable_cpu_caching_allocator

    if on:
        convret.enable_cpu_caching_allocator()
    else:
        disable_cpu_caching_allocator()


def peak_child(shape: dict, config_index: int) -> dict:
    """Fresh process: build the model, (allocator first when the row has it), one step; peak above the model."""
    config = ABLATION[config_index]
    if config.allocator:
        _set_allocator(True)
    model = build_model(shape)
    examples = make_examples(shape)
    with H.PeakMemory("cpu") as peak:
        loss = step(model, examples, shape, config)
    return {"status": H.OK, "peak_above_model_bytes": peak.above_start_bytes, "peak_process_bytes": peak.peak_bytes,
            "loss": loss}


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=2, help="training sessions per step (2)")
    parser.add_argument("--session-len", type=int, default=1024, help="session tokens (1024)")
    parser.add_argument("--passage-len", type=int, default=384, help="passage tokens (384)")
    parser.add_argument("--response-len", type=int, default=384, help="response tokens (384)")
    parser.add_argument("--negatives", type=int, default=4, help="hard negatives per session (4)")
    parser.add_argument("--hidden", type=int, default=512, help="model hidden size (512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (4)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (151936, Qwen2's)")
    parser.add_argument("--max-len", type=int, default=2048, help="row length of the one-pass packing (2048)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--engines", default="", metavar="LIST",
                        help="also measure each training engine's memory per rank at tiny size beside the "
                             "arithmetic of convret.train.memory_plan: a comma-separated list of ddp, fsdp2, zero2, "
                             "zero3, or all (2 torchrun CPU processes each, about a minute per engine; zero2 / zero3 "
                             "need deepspeed)")


def shape_of(args) -> dict:
    shape = {"sessions": args.sessions, "session": args.session_len, "passage": args.passage_len,
             "response": args.response_len, "negatives": args.negatives, "summary": 3, "hidden": args.hidden,
             "intermediate": args.hidden * 11 // 4, "layers": args.layers, "heads": max(1, args.hidden // 64),
             "kv_heads": max(1, args.hidden // 256), "vocab": args.vocab, "max_len": args.max_len}
    if args.smoke:
        shape.update(sessions=2, session=48, passage=16, response=16, negatives=2, hidden=64, intermediate=128,
                     layers=1, heads=2, kv_heads=1, vocab=1024, max_len=128)
    elif args.quick:
        shape.update(sessions=2, session=256, passage=96, response=96, negatives=3, hidden=128, intermediate=352,
                     layers=2, heads=2, kv_heads=1, vocab=16384, max_len=512)
    return shape


def run(args, argv: list[str]) -> int:
    from .engine_memory import ENGINE_NAMES

    engines = list(ENGINE_NAMES) if args.engines == "all" else [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINE_NAMES]
    if unknown:
        print(f"convret bench step: --engines {args.engines}: unknown engines {unknown}; choose from "
              f"{', '.join(ENGINE_NAMES)} or all", file=sys.stderr)
        return 2
    if args.device != "cpu":
        print("convret bench step: runs on CPU (the GPU step is part of `convret bench gpu-check`)")
        args.device = "cpu"
    if args.smoke:
        args.reps, args.warmup = 1, 1
    elif args.quick:
        args.reps, args.warmup = 2, 1
    shape = shape_of(args)
    payload: dict[str, Any] = {
        "benchmark": NAME, "command": H.command_line("convret bench", argv), "environment": H.environment("cpu"),
        "shape": shape, "reps": args.reps, "warmup": args.warmup,
        "gemm_ceiling": {"fp32": H.gemm_ceiling(torch.float32, "cpu", size=1024 if args.smoke else 2048)},
        "ablation": [dict(c.__dict__) for c in ABLATION],
        "results": [],
    }
    from convret.ops.session_attention.cpu import native_available

    configs = [c for c in ABLATION if not c.allocator or native_available()]
    if len(configs) < len(ABLATION):
        payload["not_run"] = "caching allocator: the native extension is not built"
    model = build_model(shape)
    examples = make_examples(shape)
    records: dict[str, dict] = {c.name: {} for c in configs}
    reference_grads = None
    for config in configs:  # warm-up + the numerical check: same weights, same batch, same loss
        zero_grad(model)
        if config.allocator:
            _set_allocator(True)
        loss = step(model, examples, shape, config)
        grads = lora_grads(model)
        if config.allocator:
            _set_allocator(False)
        if reference_grads is None:
            reference_grads, reference_loss = grads.clone(), loss
        records[config.name].update({
            "loss": loss, "loss_relative_error": abs(loss - reference_loss) / abs(reference_loss),
            "grad_relative_max_error": float((grads - reference_grads).abs().max() / reference_grads.abs().max())})
        zero_grad(model)

    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for _ in H.progress(range(args.reps), "bench step (rounds)"):
        for config in configs:
            if config.allocator:  # warm the cache in an untimed step, then time one step with it
                _set_allocator(True)
                step(model, examples, shape, config)
                zero_grad(model)
            start = time.perf_counter()
            step(model, examples, shape, config)
            times[config.name].append((time.perf_counter() - start) * 1e3)
            zero_grad(model)
            if config.allocator:
                _set_allocator(False)
    for config in configs:
        runs = times[config.name]
        records[config.name].update({"ms": sorted(runs)[len(runs) // 2], "runs_ms": runs})
    if not args.no_memory:
        for index, config in enumerate(H.progress(configs, "peak memory (fresh processes)")):
            child = H.run_isolated("convret.bench.step:peak_child", {"shape": shape, "config_index": ABLATION.index(config)})
            records[config.name].update({"peak_status": child["status"],
                                         **{k: v for k, v in child.items() if k.startswith("peak_")}})
            if child["status"] != H.OK:
                records[config.name]["peak_detail"] = child.get("reason") or child.get("error")
    if engines:
        from .engine_memory import measure

        payload["engines"] = measure(engines)
    tolerance = {"loss": 1e-4, "grad": 2e-3}
    for config in configs:
        rec = records[config.name]
        rec["passed"] = rec["loss_relative_error"] <= tolerance["loss"] and rec["grad_relative_max_error"] <= tolerance["grad"]
        payload["results"].append({"config": config.__dict__, **rec})
    payload["tolerance"] = tolerance
    payload["passed"] = all(r["passed"] for r in payload["results"])
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def format_report(payload: dict) -> str:
    s = payload["shape"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"Qwen2 (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads, "
             f"vocab {s['vocab']}, LoRA r=16), fp32; {s['sessions']} sessions of {s['session']} + 3 tokens, "
             f"1 + {s['negatives']} passages of {s['passage']}, responses of {s['response']}; one-pass rows of "
             f"{s['max_len']}. Step time: median of {payload['reps']} alternating rounds; peak: fresh process per row, "
             "VmHWM above the built model.", ""]
    rows = []
    ref = payload["results"][0]
    prev = None
    for r in payload["results"]:
        peak = r.get("peak_above_model_bytes")
        step_gain = f"{prev['ms'] / r['ms']:.2f}x" if prev else ""
        mem_gain = (f"{prev['peak_above_model_bytes'] / peak:.2f}x" if prev and peak and prev.get("peak_above_model_bytes")
                    else "")
        rows.append([r["config"]["name"], H.fmt_ms(r["ms"]), step_gain, f"{ref['ms'] / r['ms']:.2f}x",
                     "OOM" if r.get("peak_status") == H.OOM else ("n/a" if peak is None else f"{peak / 2**30:.2f} GiB"),
                     mem_gain, (f"{ref['peak_above_model_bytes'] / peak:.2f}x"
                                if peak and ref.get("peak_above_model_bytes") else ""),
                     f"{'pass' if r['passed'] else 'FAIL'} ({r['loss_relative_error']:.0e} / {r['grad_relative_max_error']:.0e})"])
        prev = r
    lines.append(H.markdown_table(["row", "step", "this part", "vs reference", "peak memory", "this part",
                                   "vs reference", "check: loss / LoRA grad rel. error"], rows))
    if payload.get("not_run"):
        lines.append(f"\nNot run: {payload['not_run']}")
    if payload.get("engines"):
        from .engine_memory import format_table

        lines += ["", "Engines: memory per rank, 2 CPU processes (gloo), tiny Qwen2, fp32, full fine-tuning, AdamW, "
                  "at the end of step 2 (the rank holding the most tensors); arithmetic: convret.train.memory_plan "
                  "(docs/train.md, Engines)", "", format_table(payload["engines"])]
    return "\n".join(lines)


def make_plots(payload: dict, out_dir) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"]["name"].split(" (")[0] for r in payload["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    axes[0].barh(names, [r["ms"] / 1e3 for r in payload["results"]])
    axes[0].set_xlabel("step time (s)")
    axes[1].barh(names, [(r.get("peak_above_model_bytes") or 0) / 2**30 for r in payload["results"]])
    axes[1].set_xlabel("peak memory above the model (GiB)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    fig.suptitle("CSIT step ablation (each row adds one part to the row above)", fontsize=10)
    fig.tight_layout()
    path = f"{out_dir}/step_ablation.png"
    import os

    tmp = f"{out_dir}/.step_ablation.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return [path]
