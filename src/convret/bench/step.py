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
LoRA gradients with the reference's. Time: the rows of ``--rows`` side by side in one process, in a seeded
random order each round, reversed in every second round (``--seed``, the orders recorded), medians after one warm-up step each (the allocator
row turns the cache on for its own step and off after it). Peak memory: a fresh process per row, ``VmHWM``
above the built model.

Allocators (``--allocators``, default glibc, jemalloc and tcmalloc): the reference, convret's parts on that
malloc (row ``chunked``) and convret as shipped (row ``cache``) in a fresh process per cell and round, with
``LD_PRELOAD`` set to the malloc's library (found under /usr/lib/<multiarch>; one not installed is reported as
skipped, with its Debian package); each cell one untimed and one timed step, peak RSS of both. The per-round
speed-up is the reference's fastest malloc over convret's fastest cell in that round. Headline: the median of
the per-round speed-ups (of the allocator rounds; of the in-process rounds with ``--allocators none``), written
only when the largest is at most ``--max-round-spread`` times the smallest; otherwise the report says "rounds
disagree: no headline" and the command exits with 3. The 1-min load average is recorded before and after the
run and at the start of every round.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import harness as H

NAME = "step"
ALPHA, TEMPERATURE, LABEL_SMOOTHING = 0.2, 0.01, 0.1


@dataclass(frozen=True)
class Config:
    """One row of the ablation."""

    name: str
    key: str  # its name in --rows
    kernel: bool  # attn_implementation="convret" instead of eager + dense mask
    one_pass: bool  # CSITCollator packing, one forward
    head_on_labelled_only: bool  # LM head on the labelled response tokens only
    chunked: bool  # linear_cross_entropy instead of F.cross_entropy on materialised logits
    allocator: bool  # convret.enable_cpu_caching_allocator()


ABLATION = (
    Config("reference (eager + dense mask, 4 forwards, full logits)", "reference", False, False, False, False, False),
    Config("+ session kernel", "kernel", True, False, False, False, False),
    Config("+ one-pass packing", "packing", True, True, False, False, False),
    Config("+ no LM head on embedding samples", "head", True, True, True, False, False),
    Config("+ chunked LM loss", "chunked", True, True, True, True, False),
    Config("+ caching allocator (= convret)", "cache", True, True, True, True, True),
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
    return float(loss.detach())


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


def _child_setup(shape: dict, config_index: int):
    """A measuring child's row, model and examples (the row's allocator switched on before the model is built)."""
    config = ABLATION[config_index]
    if config.allocator:
        _set_allocator(True)
    return config, build_model(shape), make_examples(shape)


def peak_child(shape: dict, config_index: int) -> dict:
    """Fresh process: build the model, (allocator first when the row has it), one step; peak above the model."""
    config, model, examples = _child_setup(shape, config_index)
    with H.PeakMemory("cpu") as peak:
        loss = step(model, examples, shape, config)
    return {"status": H.OK, "peak_above_model_bytes": peak.above_start_bytes, "peak_process_bytes": peak.peak_bytes,
            "loss": loss}


# ------------------------------------------------------------------------------------------- allocators
#: the process-wide mallocs compared (``--allocators``); glibc is the one a plain process runs on
ALLOCATORS = ("glibc", "jemalloc", "tcmalloc")
_LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
              "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
#: the ablation rows timed under every allocator: the reference, convret's parts on the process's malloc, and
#: convret as shipped (its caching allocator over the process's malloc)
ALLOCATOR_ROWS = ("reference", "chunked", "cache")


def library_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    return [f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib"]


def parse_allocators(text: str) -> list[str]:
    """``--allocators``: a comma-separated list of :data:`ALLOCATORS`, or ``none``. Raises ValueError naming an
    unknown one."""
    if text.strip() == "none":
        return []
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALLOCATORS]
    if unknown or not names:
        raise ValueError(f"--allocators {text}: unknown allocators {unknown}; choose from {', '.join(ALLOCATORS)} "
                         "(comma-separated) or none")
    return names


def find_allocators(names: Sequence[str], dirs: Sequence[str] | None = None) -> dict[str, dict]:
    """For each name: ``{"status": "ok", "preload": path or None}`` (None: glibc, nothing to preload) or
    ``{"status": "skipped", "reason": ...}`` saying what is missing and how to install it."""
    dirs = library_dirs() if dirs is None else list(dirs)
    found: dict[str, dict] = {}
    for name in names:
        if name == "glibc":
            libc = platform.libc_ver()[0]
            found[name] = ({"status": H.OK, "preload": None} if libc == "glibc" else
                           {"status": H.SKIPPED, "reason": f"this Python does not run on glibc ({libc or 'unknown libc'})"})
            continue
        paths = [os.path.join(d, lib) for lib in _LIBRARIES[name] for d in dirs]
        path = next((p for p in paths if os.path.isfile(p)), None)
        found[name] = ({"status": H.OK, "preload": path} if path else
                       {"status": H.SKIPPED, "reason": f"none of {', '.join(_LIBRARIES[name])} in {', '.join(dirs)} "
                                                       f"(Debian / Ubuntu: apt-get install {_PACKAGES[name]})"})
    return found


def _is_mapped(library: str) -> bool:
    real = os.path.realpath(library)
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(real) for line in maps)


def allocator_child(shape: dict, config_index: int, preload: str | None = None) -> dict:
    """Fresh process under one malloc (the parent sets LD_PRELOAD): build the model, one untimed step, one timed
    step; the peak RSS of both steps above the built model."""
    if preload is not None and not _is_mapped(preload):
        return {"status": H.ERROR, "error": f"LD_PRELOAD={preload} was not loaded into the child"}
    config, model, examples = _child_setup(shape, config_index)
    with H.PeakMemory("cpu") as peak:
        step(model, examples, shape, config)
        zero_grad(model)
        start = time.perf_counter()
        loss = step(model, examples, shape, config)
        ms = (time.perf_counter() - start) * 1e3
    return {"status": H.OK, "ms": ms, "peak_above_model_bytes": peak.above_start_bytes,
            "peak_process_bytes": peak.peak_bytes, "loss": loss}


def child_env(preload: str | None) -> dict[str, str]:
    """The parent's environment with LD_PRELOAD set to ``preload`` (removed for glibc, so that a preload the
    parent runs under does not leak into the glibc children)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload is not None:
        env["LD_PRELOAD"] = preload
    return env


# ------------------------------------------------------------------------------ rounds and the headline
DEFAULT_MAX_SPREAD = 1.25


def round_orders(items: Sequence, rounds: int, rng: random.Random) -> list[list]:
    """The order of ``items`` in each round: a fresh random order in the even rounds, the previous round's order
    reversed in the odd ones. A load that rises or falls during the run then never hits the same row first or last
    in every round (independent draws of a few rows often repeat: seed 0 draws one order of three rows twice), and
    over each pair of rounds a steady drift weighs on every row alike."""
    orders: list[list] = []
    for index in range(rounds):
        orders.append(orders[-1][::-1] if index % 2 else rng.sample(list(items), len(items)))
    return orders


def round_ratios(rounds: Sequence[Mapping[str, float | None]], reference: Sequence[str],
                 convret: Sequence[str]) -> list[float | None]:
    """Per round, the reference's fastest ``reference`` cell over convret's fastest ``convret`` cell (ms by
    cell name); None for a round in which either side has no time."""
    ratios: list[float | None] = []
    for times in rounds:
        ref = [times[k] for k in reference if times.get(k) is not None]
        ours = [times[k] for k in convret if times.get(k) is not None]
        ratios.append(min(ref) / min(ours) if ref and ours else None)
    return ratios


def headline(ratios: Sequence[float | None], max_spread: float = DEFAULT_MAX_SPREAD) -> dict[str, Any]:
    """The headline speed-up from per-round speed-ups: their median, unless the rounds disagree (max / min above
    ``max_spread``), in which case ``ratio`` is None and ``message`` says why."""
    complete = [r for r in ratios if r is not None]
    if not complete:
        return {"ratio": None, "agree": False, "rounds": 0, "max_spread": max_spread,
                "message": "no round has both a reference and a convret time: no headline"}
    low, high = min(complete), max(complete)
    out = {"median": statistics.median(complete), "min": low, "max": high, "spread": high / low,
           "rounds": len(complete), "max_spread": max_spread, "agree": high / low <= max_spread}
    span = f"per-round speed-ups {low:.2f}x .. {high:.2f}x, max / min {high / low:.2f}"
    if not out["agree"]:
        out.update(ratio=None, message=f"rounds disagree: no headline ({span} > --max-round-spread {max_spread}; "
                                       "rerun on a quieter machine)")
    else:
        note = ("; one round: agreement not checked (--reps 2 or more checks it)" if len(complete) == 1 else
                f" <= {max_spread}")
        out.update(ratio=out["median"], message=f"{out['median']:.2f}x faster (median of {len(complete)} round"
                                                f"{'s' * (len(complete) > 1)}; "
                                                f"{span}{note})")
    return out


def load_1min() -> float:
    return os.getloadavg()[0]


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
    parser.add_argument("--rows", default=",".join(c.key for c in ABLATION), metavar="LIST",
                        help="the ablation rows timed in process, a comma-separated list of "
                             f"{', '.join(c.key for c in ABLATION)} (default: all; reference is required, every "
                             "row is checked against it; 'packing' alone needs ~18 GiB at the default size)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), metavar="LIST",
                        help="time the reference and convret (rows chunked and cache) under each malloc, in fresh "
                             "processes with LD_PRELOAD, every round: a comma-separated list of "
                             f"{', '.join(ALLOCATORS)}, or none (default: all three; one not installed is reported "
                             "as skipped with the package to install)")
    parser.add_argument("--max-round-spread", type=float, default=DEFAULT_MAX_SPREAD, metavar="X",
                        help="no headline figure (exit code 3) when the largest per-round speed-up exceeds the "
                             f"smallest by more than this factor ({DEFAULT_MAX_SPREAD})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round random row order (0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses of the ablation")
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


def _usage_error(message: str) -> int:
    print(f"convret bench step: {message}", file=sys.stderr)
    return 2


def run(args, argv: list[str]) -> int:
    from .cli import EXIT_MISMATCH, EXIT_NO_HEADLINE, EXIT_OK
    from .engine_memory import ENGINE_NAMES

    load_before = load_1min()
    engines = list(ENGINE_NAMES) if args.engines == "all" else [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINE_NAMES]
    if unknown:
        return _usage_error(f"--engines {args.engines}: unknown engines {unknown}; choose from "
                            f"{', '.join(ENGINE_NAMES)} or all")
    keys = [c.key for c in ABLATION]
    rows = list(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
    if [r for r in rows if r not in keys] or "reference" not in rows:
        return _usage_error(f"--rows {args.rows}: choose from {', '.join(keys)} (comma-separated); reference is "
                            "required (every row is checked against it)")
    try:
        allocator_names = parse_allocators(args.allocators)
    except ValueError as error:
        return _usage_error(str(error))
    if not args.max_round_spread >= 1.0:
        return _usage_error(f"--max-round-spread {args.max_round_spread}: must be >= 1 (max / min of the per-round "
                            "speed-ups)")
    if args.device != "cpu":
        print("convret bench step: runs on CPU (the GPU step is part of `convret bench gpu-check`)")
        args.device = "cpu"
    if args.smoke:
        args.reps, args.warmup = 1, 1
    elif args.quick:
        args.reps, args.warmup = 2, 1
    if args.reps < 1:
        return _usage_error(f"--reps {args.reps}: at least one round")
    shape = shape_of(args)
    rng = random.Random(args.seed)
    payload: dict[str, Any] = {
        "benchmark": NAME, "command": H.command_line("convret bench", argv), "environment": H.environment("cpu"),
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "shape": shape, "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
        "max_round_spread": args.max_round_spread,
        "gemm_ceiling": {"fp32": H.gemm_ceiling(torch.float32, "cpu", size=1024 if args.smoke else 2048)},
        "ablation": [dict(c.__dict__) for c in ABLATION],
        "results": [],
    }
    from convret.ops.session_attention.cpu import native_available

    configs = [c for c in ABLATION if c.key in rows and (not c.allocator or native_available())]
    if any(c.allocator for c in ABLATION if c.key in rows) and not native_available():
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

    orders = round_orders(configs, args.reps, rng)
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    round_loads = []
    for order in H.progress(orders, "bench step (rounds)"):
        round_loads.append(load_1min())
        for config in order:
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
        records[config.name].update({"ms": statistics.median(runs), "runs_ms": runs})
    convret_row = configs[-1]
    per_round = [{c.name: times[c.name][r] for c in configs} for r in range(args.reps)]
    payload["rounds"] = {"orders": [[c.key for c in order] for order in orders], "load_1min": round_loads,
                         "convret_row": convret_row.key,
                         "ratios": round_ratios(per_round, [configs[0].name], [convret_row.name])}
    del model
    if not args.no_memory:
        for config in H.progress(configs, "peak memory (fresh processes)"):
            child = H.run_isolated("convret.bench.step:peak_child", {"shape": shape, "config_index": ABLATION.index(config)})
            records[config.name].update({"peak_status": child["status"],
                                         **{k: v for k, v in child.items() if k.startswith("peak_")}})
            if child["status"] != H.OK:
                records[config.name]["peak_detail"] = child.get("reason") or child.get("error")
    tolerance = {"loss": 1e-4, "grad": 2e-3}
    if allocator_names:
        payload["allocators"] = measure_allocators(allocator_names, shape, args.reps, rng, reference_loss,
                                                   tolerance["loss"], native_available())
    if engines:
        from .engine_memory import measure

        payload["engines"] = measure(engines)
    for config in configs:
        rec = records[config.name]
        rec["passed"] = rec["loss_relative_error"] <= tolerance["loss"] and rec["grad_relative_max_error"] <= tolerance["grad"]
        payload["results"].append({"config": config.__dict__, **rec})
    payload["tolerance"] = tolerance
    allocators = payload.get("allocators")
    ratios = allocators["ratios"] if allocators else payload["rounds"]["ratios"]
    payload["headline"] = {**headline(ratios, args.max_round_spread),
                           "source": "allocators" if allocators else "ablation"}
    payload["passed"] = (all(r["passed"] for r in payload["results"])
                         and all(c.get("passed", True) for c in (allocators or {}).get("cells", [])))
    payload["load_1min"] = {"before": load_before, "after": load_1min()}
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    if not payload["passed"]:
        return EXIT_MISMATCH
    if payload["headline"]["ratio"] is None:
        print(f"convret bench step: {payload['headline']['message']}", file=sys.stderr)
        return EXIT_NO_HEADLINE
    return EXIT_OK


def measure_allocators(names: Sequence[str], shape: dict, reps: int, rng: random.Random, reference_loss: float,
                       loss_tolerance: float, native: bool) -> dict[str, Any]:
    """Every (allocator, row) cell once per round, in a fresh process each, in the order of :func:`round_orders`."""
    found = find_allocators(names)
    usable = [n for n in names if found[n]["status"] == H.OK]
    rows = [k for k in ALLOCATOR_ROWS if k != "cache" or native]
    cells = [(a, k) for a in usable for k in rows]
    index = {c.key: i for i, c in enumerate(ABLATION)}
    runs: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    orders = round_orders(cells, reps, rng) if cells else []
    loads = []
    for order in H.progress(orders, "allocators (rounds of fresh processes)"):
        loads.append(load_1min())
        for allocator, key in order:
            preload = found[allocator]["preload"]
            runs[(allocator, key)].append(H.run_isolated(
                "convret.bench.step:allocator_child", {"shape": shape, "config_index": index[key], "preload": preload},
                env=child_env(preload)))
    out_cells = []
    for (allocator, key), records in runs.items():
        ok = [r for r in records if r["status"] == H.OK]
        cell: dict[str, Any] = {"allocator": allocator, "row": key, "runs_ms": [r.get("ms") for r in records],
                                "statuses": [r["status"] for r in records]}
        if ok:
            cell.update(ms=statistics.median(r["ms"] for r in ok),
                        peak_above_model_bytes=statistics.median(r["peak_above_model_bytes"] for r in ok),
                        loss_relative_error=max(abs(r["loss"] - reference_loss) / abs(reference_loss) for r in ok))
            cell["passed"] = len(ok) == len(records) and cell["loss_relative_error"] <= loss_tolerance
        else:
            cell["passed"] = False
        failed = [r.get("reason") or r.get("error") for r in records if r["status"] != H.OK]
        if failed:
            cell["detail"] = failed[0]
        out_cells.append(cell)
    per_round = [{f"{a}/{k}": (runs[(a, k)][r].get("ms") if runs[(a, k)][r]["status"] == H.OK else None)
                  for a, k in cells} for r in range(len(orders))]
    ratios = round_ratios(per_round, [f"{a}/reference" for a in usable],
                          [f"{a}/{k}" for a in usable for k in rows if k != "reference"])

    def best(candidates, key):
        good = [c for c in out_cells if c.get(key) is not None and (c["allocator"], c["row"]) in candidates]
        return min(good, key=lambda c: c[key]) if good else None

    reference_cells = {(a, "reference") for a in usable}
    convret_cells = {(a, k) for a in usable for k in rows if k != "reference"}
    return {"found": found, "rows": rows, "orders": [[f"{a}/{k}" for a, k in order] for order in orders],
            "load_1min": loads, "cells": out_cells, "ratios": ratios,
            "best": {"reference_time": best(reference_cells, "ms"), "convret_time": best(convret_cells, "ms"),
                     "reference_peak": best(reference_cells, "peak_above_model_bytes"),
                     "convret_peak": best(convret_cells, "peak_above_model_bytes")}}


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def format_report(payload: dict) -> str:
    s = payload["shape"]
    load = payload["load_1min"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]),
             f"1-min load average: {load['before']:.2f} before the run, {load['after']:.2f} after; seed "
             f"{payload['seed']}" + (f"; the parent ran with LD_PRELOAD={payload['ld_preload']}"
                                     if payload.get("ld_preload") else ""), ""]
    lines += _headline_lines(payload) + [""]
    lines += [f"Qwen2 (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads, "
              f"vocab {s['vocab']}, LoRA r=16), fp32; {s['sessions']} sessions of {s['session']} + 3 tokens, "
              f"1 + {s['negatives']} passages of {s['passage']}, responses of {s['response']}; one-pass rows of "
              f"{s['max_len']}. Step time: median of {payload['reps']} round{'s' * (payload['reps'] > 1)}, all rows in one process, in a random "
              "order each round (every second round the previous one reversed); peak: fresh process per row, VmHWM above the built model.", ""]
    rows = []
    ref = payload["results"][0]
    keys = [c["key"] for c in payload["ablation"]]
    prev = None
    for r in payload["results"]:
        peak = r.get("peak_above_model_bytes")
        adjacent = prev is not None and keys.index(r["config"]["key"]) == keys.index(prev["config"]["key"]) + 1
        step_gain = f"{prev['ms'] / r['ms']:.2f}x" if adjacent else ""
        mem_gain = (f"{prev['peak_above_model_bytes'] / peak:.2f}x"
                    if adjacent and peak and prev.get("peak_above_model_bytes") else "")
        rows.append([r["config"]["name"], H.fmt_ms(r["ms"]), step_gain, f"{ref['ms'] / r['ms']:.2f}x",
                     "OOM" if r.get("peak_status") == H.OOM else ("n/a" if peak is None else _gib(peak)),
                     mem_gain, (f"{ref['peak_above_model_bytes'] / peak:.2f}x"
                                if peak and ref.get("peak_above_model_bytes") else ""),
                     f"{'pass' if r['passed'] else 'FAIL'} ({r['loss_relative_error']:.0e} / {r['grad_relative_max_error']:.0e})"])
        prev = r
    lines.append(H.markdown_table(["row", "step", "this part", "vs reference", "peak memory", "this part",
                                   "vs reference", "check: loss / LoRA grad rel. error"], rows))
    rounds = payload["rounds"]
    lines += ["", "Rounds (order; 1-min load at the start; reference / "
              f"{rounds['convret_row']} in that round): " + "; ".join(
                  f"{i + 1}: {' '.join(order)} (load {load:.2f}) {ratio:.2f}x"
                  for i, (order, load, ratio) in enumerate(zip(rounds["orders"], rounds["load_1min"], rounds["ratios"])))]
    if payload.get("not_run"):
        lines.append(f"\nNot run: {payload['not_run']}")
    if payload.get("allocators"):
        lines += [""] + _allocator_lines(payload["allocators"])
    if payload.get("engines"):
        from .engine_memory import format_table

        lines += ["", "Engines: memory per rank, 2 CPU processes (gloo), tiny Qwen2, fp32, full fine-tuning, AdamW, "
                  "at the end of step 2 (the rank holding the most tensors); arithmetic: convret.train.memory_plan "
                  "(docs/train.md, Engines)", "", format_table(payload["engines"])]
    return "\n".join(lines)


def _headline_lines(payload: dict) -> list[str]:
    head = payload["headline"]
    if head["ratio"] is None:
        return [f"**Headline: {head['message']}**"]
    if head["source"] == "allocators":
        best = payload["allocators"]["best"]
        text = (f"**Headline: convret {head['message']}: convret's best ({best['convret_time']['row']} on "
                f"{best['convret_time']['allocator']}) against the reference's best allocator "
                f"({best['reference_time']['allocator']})")
        if best["reference_peak"] and best["convret_peak"]:
            text += (f"; peak memory {best['reference_peak']['peak_above_model_bytes'] / best['convret_peak']['peak_above_model_bytes']:.2f}x "
                     f"less (leanest: reference on {best['reference_peak']['allocator']}, convret "
                     f"{best['convret_peak']['row']} on {best['convret_peak']['allocator']})")
        return [text + "**"]
    return [f"**Headline: convret {head['message']}, against the reference on this process's malloc only "
            "(--allocators none)**"]


def _allocator_lines(allocators: dict) -> list[str]:
    lines = ["Allocators: each cell a fresh process (LD_PRELOAD; glibc: none), one untimed and one timed step, "
             "every round in a random order (every second round the previous one reversed); step: median over rounds; peak: VmHWM of both steps above the "
             "built model. Rows: reference; chunked = convret's parts on that malloc; cache = convret as shipped "
             "(its caching allocator for blocks of 1 MiB or more, that malloc below).", ""]
    best = allocators["best"]
    ref_ms = best["reference_time"]["ms"] if best["reference_time"] else None
    ref_peak = best["reference_peak"]["peak_above_model_bytes"] if best["reference_peak"] else None
    table = []
    for c in allocators["cells"]:
        runs = " / ".join("fail" if ms is None else H.fmt_ms(ms) for ms in c["runs_ms"])
        ms, peak = c.get("ms"), c.get("peak_above_model_bytes")
        table.append([c["allocator"], c["row"], H.fmt_ms(ms), runs,
                      f"{ref_ms / ms:.2f}x" if ref_ms and ms else "", _gib(peak),
                      f"{ref_peak / peak:.2f}x" if ref_peak and peak else "",
                      ("pass" if c["passed"] else f"FAIL{': ' + str(c['detail'])[:200] if c.get('detail') else ''}")])
    lines.append(H.markdown_table(["malloc", "row", "step", "rounds", "vs reference's best", "peak memory",
                                   "vs reference's leanest", "check"], table))
    skipped = {n: f["reason"] for n, f in allocators["found"].items() if f["status"] != H.OK}
    for name, reason in skipped.items():
        lines.append(f"\nSkipped {name}: {reason}")
    lines += ["", "Rounds (order; 1-min load at the start; reference's best / convret's best in that round): " + "; ".join(
        f"{i + 1}: {' '.join(order)} (load {load:.2f}) " + ("n/a" if ratio is None else f"{ratio:.2f}x")
        for i, (order, load, ratio) in enumerate(zip(allocators["orders"], allocators["load_1min"], allocators["ratios"])))]
    return lines


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
