"""One CSIT training step on CPU: convret's one-pass step against the reference approach.

Model: Qwen2 architecture, hidden 512, intermediate 1408, 4 layers, 8 heads, 2 KV heads, vocabulary 151,936,
untied LM head, LoRA r=16 on q/k/v/o, fp32. Per session: one query (1024 tokens + 3 summary tokens), 1 + 4
passages of 384 tokens (+ 3 summary tokens), one LM sequence [session 1024, summary 3, response 384, summary 3].
Loss: InfoNCE (tau 0.01, L2-normalised) + 0.2 x label-smoothed (0.1) LM loss.

- reference: what the released CSIT code does. Four forwards (sessions, positives, negatives, LM sequences),
  attn_implementation="eager", a dense additive [B, 1, L, L] session mask for the LM sequences,
  full-vocabulary logits on every pass, naive InfoNCE on the [Q, P] logits.
- convret: CSITCollator packs everything into rows of --max-len tokens, one decoder forward with
  attn_implementation="convret" (session_attention, backend "auto"), embeddings read at the summary tokens,
  chunked linear cross-entropy on the response tokens only, convret.info_nce.

Usage::

    python bench/bench_csit_step.py                    # timing side by side + peak RSS (subprocesses), 2 sessions
    python bench/bench_csit_step.py --sessions 4              # the reference needs ~19 GB here
    python bench/bench_csit_step.py --malloc default --no-peaks   # timing only, under glibc's defaults
    python bench/bench_csit_step.py --peak convret     # one subprocess measurement (used by the driver)

Timing: medians of --steps timed steps after one warm-up step each, both approaches in one process,
alternating. Peak memory: ru_maxrss of a fresh process that builds the model and runs one step, for every approach under
each host allocator (glibc defaults, convret.tune_cpu_malloc(), convret.enable_cpu_caching_allocator()).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SESSION_LEN, SUMMARY_LEN, PASSAGE_LEN, RESPONSE_LEN, NEGATIVES = 1024, 3, 384, 384, 4
VOCAB = 151936
ALPHA, TEMPERATURE, LABEL_SMOOTHING = 0.2, 0.01, 0.1


def build_model(seed: int = 0):
    import peft
    import transformers

    import convret.hf  # noqa: F401

    config = transformers.Qwen2Config(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret", dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora)
    model.train()
    return model


def make_examples(sessions: int, seed: int = 0):
    from convret.collate import CSITExample

    rng = random.Random(seed)

    def text(n):
        return [rng.randrange(1, VOCAB - SUMMARY_LEN) for _ in range(n)]

    return [
        CSITExample(session=text(SESSION_LEN), positive=text(PASSAGE_LEN),
                    negatives=[text(PASSAGE_LEN) for _ in range(NEGATIVES)], response=text(RESPONSE_LEN))
        for _ in range(sessions)
    ]


SUMMARY_IDS = list(range(VOCAB - SUMMARY_LEN, VOCAB))


# ---------------------------------------------------------------------- the two steps
def reference_step(model, examples) -> float:
    """Four forwards, eager + dense masks, full-vocabulary logits; returns the loss after backward."""
    from convret import SessionLayout
    from convret.baselines import additive_mask

    model.set_attn_implementation("eager")

    def embed(seqs):  # all sequences of one pass have the same length here: no padding needed
        ids = torch.tensor(seqs)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)  # logits computed, then unused
        return F.normalize(out.hidden_states[-1][:, -1], dim=-1)

    queries = embed([list(e.session) + SUMMARY_IDS for e in examples])
    positives = embed([list(e.positive) + SUMMARY_IDS for e in examples])
    negatives = embed([list(n) + SUMMARY_IDS for e in examples for n in e.negatives])
    k = NEGATIVES
    passages = torch.cat([positives.unsqueeze(1), negatives.view(len(examples), k, -1)], 1).flatten(0, 1)
    contrastive = F.cross_entropy(queries @ passages.t() / TEMPERATURE, torch.arange(len(examples)) * (k + 1))

    ids = torch.tensor([list(e.session) + SUMMARY_IDS + list(e.response) + SUMMARY_IDS for e in examples])
    layout = SessionLayout.from_segments(
        [[(SESSION_LEN, SUMMARY_LEN, RESPONSE_LEN + SUMMARY_LEN)] for _ in examples], ids.shape[1])
    mask = additive_mask(layout, torch.float32)
    labels = torch.full_like(ids, -100)
    start = SESSION_LEN + SUMMARY_LEN
    labels[:, start : start + RESPONSE_LEN] = ids[:, start : start + RESPONSE_LEN]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=layout.position_ids(), use_cache=False).logits
    generation = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                 label_smoothing=LABEL_SMOOTHING)
    loss = contrastive + ALPHA * generation
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def convret_step(model, examples, max_len: int, checkpointing: bool = False) -> float:
    from convret.collate import CSITCollator
    from convret.csit import CSITLoss

    model.set_attn_implementation("convret")
    set_checkpointing(model, checkpointing)
    batch = CSITCollator(SUMMARY_IDS, pad_token_id=0, max_len=max_len, pad_to_multiple_of=64)(examples)
    out = CSITLoss(alpha=ALPHA, temperature=TEMPERATURE, label_smoothing=LABEL_SMOOTHING)(model, batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.item()


def set_checkpointing(model, enabled: bool) -> None:
    """Non-reentrant activation checkpointing of the decoder layers on or off (transformers 5.x names, 4.x
    fallback)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


IMPLS = ("convret", "convret+ckpt", "reference")


def run_step(impl: str, model, examples, max_len: int) -> float:
    if impl == "reference":
        set_checkpointing(model, False)
        return reference_step(model, examples)
    return convret_step(model, examples, max_len, checkpointing=impl == "convret+ckpt")


# ---------------------------------------------------------------------- measurements
# glibc keeps freed heap blocks below its dynamic mmap threshold (which rises up to 32 MB): activation-sized
# temporaries fragment the heap and inflate RSS, and blocks above it are page-faulted afresh on every step.
# Every peak is measured under three host allocators, for every approach:
#   default: glibc's defaults; mmap: convret.tune_cpu_malloc() (threshold fixed at 1 MiB);
#   cache: convret.enable_cpu_caching_allocator() (torch's CPU blocks >= 1 MiB reused by size class).
MALLOC_MODES = ("default", "mmap", "cache")


def peak_rss(impl: str, sessions: int, max_len: int) -> dict:
    """In this (fresh) process: build the model, run one step, report peak RSS in GB."""
    model = build_model()
    examples = make_examples(sessions)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    loss = run_step(impl, model, examples, max_len)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"impl": impl, "sessions": sessions, "peak_rss_gb": peak, "rss_after_model_gb": before, "loss": loss}


def apply_malloc(mode: str) -> None:
    import convret

    if mode == "mmap" and not convret.tune_cpu_malloc(override_env=True):
        raise SystemExit("convret.tune_cpu_malloc() did not take effect (not glibc?)")
    if mode == "cache":
        convret.enable_cpu_caching_allocator()


def peak_in_subprocess(impl: str, sessions: int, max_len: int, malloc: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--peak", impl, "--sessions", str(sessions),
           "--max-len", str(max_len), "--malloc", malloc]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"impl": impl, "sessions": sessions, "error": result.stderr[-2000:]}
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["malloc"] = malloc
    return out


def reference_peak_gb(sessions: int) -> float:
    """The reference's peak RSS with glibc defaults, fitted to measurements here: 9.89 GB with 2 sessions,
    18.80 GB with 4 (the model itself is 1.09 GB)."""
    return 1.09 + 4.43 * sessions


def available_memory_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def timing(sessions: int, steps: int, max_len: int, impls: list[str]) -> dict:
    model = build_model()
    examples = make_examples(sessions)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    losses: dict[str, float] = {}
    for impl in impls:  # warm-up
        losses[impl] = run_step(impl, model, examples, max_len)
    for _ in range(steps):
        for impl in impls:
            t0 = time.perf_counter()
            run_step(impl, model, examples, max_len)
            times[impl].append(time.perf_counter() - t0)
    return {"sessions": sessions, "step_s": {k: statistics.median(v) for k, v in times.items()},
            "all_step_s": times, "loss": losses}


def describe_packing(sessions: int, max_len: int) -> dict:
    from convret.collate import CSITCollator

    batch = CSITCollator(SUMMARY_IDS, pad_token_id=0, max_len=max_len, pad_to_multiple_of=64)(make_examples(sessions))
    return batch.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per approach (after one warm-up)")
    parser.add_argument("--max-len", type=int, default=2048, help="row length of the packed one-pass batch")
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="cache",
                        help="glibc malloc of the timing process (both approaches alike), and of a --peak run")
    parser.add_argument("--peak", choices=IMPLS, help="internal: one peak-RSS measurement")
    parser.add_argument("--no-reference", action="store_true", help="time convret only")
    parser.add_argument("--no-peaks", action="store_true",
                        help="timing only (for a second timing process under another --malloc)")
    parser.add_argument("--min-free-gb", type=float, default=None,
                        help="skip the reference when less memory is available (default: its expected need + 2 GB)")
    args = parser.parse_args()
    apply_malloc(args.malloc)

    if args.peak:
        print(json.dumps(peak_rss(args.peak, args.sessions, args.max_len)))
        return

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, sessions {args.sessions}, "
          f"max_len {args.max_len}, malloc of the timing process: {args.malloc}")
    import convret
    from convret.ops.session_attention import resolve_backend

    print("session_attention backend (auto on CPU):", resolve_backend("auto", torch.device("cpu")),
          "| available:", convret.available_backends())
    print("packing:", describe_packing(args.sessions, args.max_len))
    need = args.min_free_gb if args.min_free_gb is not None else reference_peak_gb(args.sessions) + 2  # 2 GB headroom
    free = available_memory_gb()
    with_reference = not args.no_reference and free >= need
    if not with_reference and not args.no_reference:
        print(f"reference skipped: {free:.1f} GB available, needs ~{need:.1f} GB (does not fit alongside other work)")

    impls = ["convret", "convret+ckpt"] + (["reference"] if with_reference else [])
    peak_modes = () if args.no_peaks else MALLOC_MODES
    peaks: dict[tuple[str, str], float] = {}
    for impl in impls:
        for malloc in peak_modes:
            p = peak_in_subprocess(impl, args.sessions, args.max_len, malloc)
            print("peak:", json.dumps(p), flush=True)
            peaks[impl, malloc] = p.get("peak_rss_gb", float("nan"))
    result = timing(args.sessions, args.steps, args.max_len, impls)
    print("timing:", json.dumps(result))

    names = {"reference": "reference (eager + dense mask, 4 forwards, full logits)",
             "convret": "convret one-pass", "convret+ckpt": "convret one-pass + gradient checkpointing"}
    ref_t = result["step_s"].get("reference")
    print()
    print((f"| sessions | approach | step time (s, median; malloc {args.malloc}) | "
           + "".join(f"peak RSS, {m} (GB) | " for m in peak_modes)).rstrip())
    print("|---|---|---|" + "---|" * len(peak_modes))
    if not with_reference:
        print(f"| {args.sessions} | {names['reference']} | not run |" + " not run |" * len(peak_modes))
    for impl in impls:
        print((f"| {args.sessions} | {names[impl]} | {result['step_s'][impl]:.2f} | "
               + "".join(f"{peaks[impl, m]:.2f} | " for m in peak_modes)).rstrip())
    if ref_t:
        for impl in ("convret", "convret+ckpt"):
            line = f"{impl}: {ref_t / result['step_s'][impl]:.2f}x faster (target >= 3x)"
            if peak_modes:
                same = ", ".join(f"{m} {peaks['reference', m] / peaks[impl, m]:.2f}x" for m in peak_modes)
                line += (f"; peak RSS lower by {peaks['reference', 'default'] / peaks[impl, 'cache']:.2f}x against "
                         f"the reference as released (glibc defaults) with convret's caching allocator; same "
                         f"allocator on both sides: {same} (target >= 4x)")
            print(line)


if __name__ == "__main__":
    main()
