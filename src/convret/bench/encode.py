"""``convret bench encode``: convret's retrieval encoder against the plain Hugging Face way.

Measures the code ``convret encode`` runs, :func:`convret.retrieval.encoder.embed_sequences` (sequences
sorted by length, packed back to back into rows of at most ``--token-budget`` tokens with a
:class:`convret.SessionLayout`, decoder only, ``attn_implementation="convret"``), against the plain HF way
(``*ForCausalLM`` with SDPA, right-padded batches of ``--hf-batch`` in input order with an ``attention_mask``,
``output_hidden_states=True`` so the LM head is computed too, the last non-padding token's final hidden state,
L2-normalised). The model is a tiny Qwen2 built from a config (hidden 128, 2 layers, vocabulary 512 by
default; no weights downloaded), the same weights for both ways.

1. Throughput: ``--passages`` passages of a realistic length mix (log-normal, median ~90 tokens, clipped to
   [16, 384]), both ways side by side in one process, medians of ``--reps`` rounds after ``--warmup``.
2. Equality: the two ways' embeddings must agree (fp32, max abs difference <= 1e-5 on unit vectors);
   a mismatch fails the command (exit code 1).
3. Peak memory of encoding ONE session of each ``--lengths`` (default 4k, 8k, 16k, 32k tokens), a fresh
   process per (way, length) (``VmHWM`` reset just before the forward, so only the forward counts): convret,
   HF alone, and HF in a padded batch of two (the second one token shorter, so transformers builds a dense
   4-D mask). A measurement whose estimated need exceeds the memory guard is reported as OOM, not run.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from . import harness as H

NAME = "encode"
WAYS = ("convret encoder", "HF padded, sdpa")
MEMORY_WAYS = ("convret encoder", "HF alone, sdpa", "HF padded batch of 2, sdpa")
TOLERANCE = 1e-5


def build_model(shape: dict, attn: str):
    import transformers

    import convret.hf  # noqa: F401  (registers attn_implementation="convret")

    config = transformers.Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                                      intermediate_size=shape["hidden"], num_hidden_layers=shape["layers"],
                                      num_attention_heads=max(1, shape["hidden"] // 32), num_key_value_heads=2,
                                      max_position_embeddings=max(shape["max_len"] + 8, 512),
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM._from_config(config, attn_implementation=attn,
                                                      dtype=torch.float32).eval()


def passage_mix(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [min(384, max(16, int(rng.lognormvariate(4.5, 0.6)))) for _ in range(n)]
    return [[rng.randrange(10, vocab) for _ in range(k)] for k in lengths]


@torch.no_grad()
def hf_encode(model, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """The plain HF way: padded batches in input order, SDPA, ``output_hidden_states``, last real token."""
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last = mask.sum(1) - 1
        out.append(torch.nn.functional.normalize(hidden[torch.arange(len(batch)), last].float(), dim=-1))
    return torch.cat(out)


def memory_estimate_bytes(way: str, length: int) -> float:
    """Rough need of the dense 4-D mask the padded HF batch builds (bool + float copies, two rows)."""
    return 2 * 5.0 * length * length if way.startswith("HF padded") else 0.0


def peak_child(shape: dict, way: str, length: int) -> dict:
    from convret.retrieval.encoder import embed_sequences

    model = build_model(shape, "convret" if way == "convret encoder" else "sdpa")
    ids = torch.randint(10, shape["vocab"], (1, length), generator=torch.Generator().manual_seed(length))
    seq = ids[0].tolist()
    with torch.no_grad():  # library initialisation outside the peak
        if way == "convret encoder":
            embed_sequences(model, [seq[:64]], token_budget=length)
        else:
            model(input_ids=ids[:, :64], attention_mask=torch.ones(1, 64, dtype=torch.long), output_hidden_states=True)
    start = time.perf_counter()
    with H.PeakMemory("cpu") as peak, torch.no_grad():
        if way == "convret encoder":
            embed_sequences(model, [seq], token_budget=length)
        elif way == "HF alone, sdpa":
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            out.hidden_states[-1][0, -1].clone()
            del out
        else:
            batch = ids.expand(2, -1).contiguous()
            mask = torch.ones_like(batch)
            mask[1, -1] = 0
            out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True)
            out.hidden_states[-1][0, -1].clone()
            del out
    return {"status": H.OK, "peak_above_model_bytes": peak.above_start_bytes,
            "seconds": time.perf_counter() - start}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="4096,8192,16384,32768",
                        help="session lengths of the peak-memory part (default 4096,8192,16384,32768)")
    parser.add_argument("--passages", type=int, default=2000, help="passages of the throughput mix (2000)")
    parser.add_argument("--token-budget", type=int, default=16384, help="convret tokens per packed row (16384)")
    parser.add_argument("--hf-batch", type=int, default=32, help="HF padded batch size (32)")
    parser.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (128)")
    parser.add_argument("--layers", type=int, default=2, help="tiny model layers (2)")
    parser.add_argument("--vocab", type=int, default=512, help="tiny model vocabulary (512)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")


def run(args, argv: list[str]) -> int:
    from convret.retrieval.encoder import embed_sequences

    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths, args.passages, args.reps, args.warmup = [256], 48, 2, 0
    elif args.quick:
        lengths, args.passages, args.reps, args.warmup = [2048, 4096, 8192], 300, 3, 1
    shape = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "max_len": max(lengths + [384])}
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "shape": shape, "reps": args.reps,
                               "warmup": args.warmup, "token_budget": args.token_budget, "hf_batch": args.hf_batch,
                               "gemm_ceiling": {"fp32": H.gemm_ceiling(torch.float32, "cpu",
                                                                       size=1024 if args.smoke else 2048)}}
    ours, hf = build_model(shape, "convret"), build_model(shape, "sdpa")
    hf.load_state_dict(ours.state_dict())
    sequences = passage_mix(args.passages, args.vocab)
    fns = {"convret encoder": lambda: embed_sequences(ours, sequences, args.token_budget),
           "HF padded, sdpa": lambda: hf_encode(hf, sequences, args.hf_batch)}
    embeddings = {way: fn() for way, fn in fns.items()}
    diff = float((embeddings["convret encoder"] - embeddings["HF padded, sdpa"]).abs().max())
    times = H.interleaved_ms(fns, reps=args.reps, warmup=args.warmup)
    real = sum(map(len, sequences))
    throughput = {}
    for way in WAYS:
        ms = sorted(times[way])[len(times[way]) // 2]
        throughput[way] = {"ms": ms, "runs_ms": times[way], "passages_per_s": len(sequences) / (ms / 1e3),
                           "real_tokens_per_s": real / (ms / 1e3)}
    payload["throughput"] = {"passages": len(sequences), "mean_len": real / len(sequences),
                             "max_len": max(map(len, sequences)), "ways": throughput,
                             "speedup": throughput["HF padded, sdpa"]["ms"] / throughput["convret encoder"]["ms"]}
    payload["equality"] = {"max_abs_diff": diff, "tolerance": TOLERANCE, "passed": diff <= TOLERANCE}
    payload["memory"] = []
    if not args.no_memory:
        guard = H.memory_guard_bytes(args.max_memory_gib, "cpu")
        for length in H.progress(lengths, "bench encode (memory)"):
            row = {"length": length, "ways": {}}
            for way in MEMORY_WAYS:
                need = memory_estimate_bytes(way, length)
                row["ways"][way] = (H.oom_result(need, guard) if need > guard else
                                    H.run_isolated("convret.bench.encode:peak_child",
                                                   {"shape": shape, "way": way, "length": length}))
            payload["memory"].append(row)
    payload["passed"] = payload["equality"]["passed"]
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    return 0 if payload["passed"] else 1


def _peak_cell(record: dict) -> str:
    if record.get("status") == H.OOM:
        return "OOM (not run)" if "estimated_bytes" in record else "OOM"
    if record.get("status") != H.OK:
        return "error"
    return f"{H.fmt_mib(record['peak_above_model_bytes'])} ({record['seconds']:.2f} s)"


def format_report(payload: dict) -> str:
    s, t, e = payload["shape"], payload["throughput"], payload["equality"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"Tiny Qwen2 (hidden {s['hidden']}, {s['layers']} layers, vocabulary {s['vocab']}), fp32, no_grad.", "",
             f"Throughput: {t['passages']} passages (mean {t['mean_len']:.0f}, max {t['max_len']} tokens), median of "
             f"{payload['reps']} side-by-side rounds; convret packs rows of {payload['token_budget']} tokens, HF "
             f"pads batches of {payload['hf_batch']}.", ""]
    rows = [[way, H.fmt_ms(r["ms"]), f"{r['passages_per_s']:.0f}", f"{r['real_tokens_per_s']:.0f}"]
            for way, r in t["ways"].items()]
    lines.append(H.markdown_table(["way", "time", "passages/s", "real tokens/s"], rows))
    lines += ["", f"convret x{t['speedup']:.2f} vs HF; embeddings max |diff| {e['max_abs_diff']:.1e} "
                  f"(tolerance {e['tolerance']:.0e}): {'pass' if e['passed'] else 'FAIL'}."]
    if payload["memory"]:
        lines += ["", "Peak memory of encoding one session (fresh process, VmHWM above the model; forward time):", ""]
        rows = [[f"{m['length']:,}", *(_peak_cell(m["ways"][w]) for w in MEMORY_WAYS)] for m in payload["memory"]]
        lines.append(H.markdown_table(["session tokens", *MEMORY_WAYS], rows))
    return "\n".join(lines)


def make_plots(payload: dict, out_dir) -> list:
    if not payload["memory"]:
        return []
    series = {w: [(m["length"], m["ways"][w]["peak_above_model_bytes"] / 2**20
                   if m["ways"][w].get("status") == H.OK else None) for m in payload["memory"]] for w in MEMORY_WAYS}
    return [H.plot_lines(f"{out_dir}/encode_memory.png", series, "session length (tokens)",
                         "peak memory above the model (MiB)", "encoding one session (peak memory)")]
