"""``convret bench encode``: embedding sessions, memory and throughput against session length.

Measurement core (runs now, needs only convret and transformers): a tiny Qwen2 decoder built from a config
(hidden 256, 4 layers, 4 heads / 1 KV head, vocabulary 32000; no weights downloaded) embeds a batch of
--batch sessions of lengths N, 3N/4, N/2, N/4 (+ t = 3 summary tokens each), under ``torch.no_grad``:

- ``HF padded, eager`` / ``HF padded, sdpa``: the plain Hugging Face way: right-padded to the longest with
  an ``attention_mask``, ``model.model(...)``, the last summary token of each row;
- ``convret packed``: every session packed into one row (no padding), ``attn_implementation="convret"``,
  ``model.model(..., session_layout=layout)``, pooled at each sample's last summary token.

Check: the embeddings of both ways agree (fp32). Throughput: real (non-padding) tokens per second, all
methods side by side in one process. Peak memory: a fresh process per (method, N), ``VmHWM`` above the model.

The encoder of ``convret.retrieval`` (when that package is installed) is measured by the same core; without
it this command writes the core's results and exits with code 3 and a message saying so.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import torch

from . import harness as H

NAME = "encode"
METHODS = ("HF padded, eager", "HF padded, sdpa", "convret packed")
SUMMARY = 3


def build_model(shape: dict, attn: str):
    import transformers

    import convret.hf  # noqa: F401

    config = transformers.Qwen2Config(hidden_size=shape["hidden"], intermediate_size=shape["hidden"] * 11 // 4,
                                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=1, vocab_size=shape["vocab"],
                                      max_position_embeddings=16384, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def sessions_for(length: int, batch: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(length)
    lengths = [max(1, length * (batch - i) // batch) for i in range(batch)]
    summary = list(range(vocab - SUMMARY, vocab))
    return [torch.randint(1, vocab - SUMMARY, (n,), generator=gen).tolist() + summary for n in lengths]


def embed(model, method: str, sessions: list[list[int]]) -> torch.Tensor:
    """``[batch, hidden]`` embeddings (last summary token's final hidden state) of ``sessions``."""
    from convret import SessionLayout

    with torch.no_grad():
        if method == "convret packed":
            ids = torch.tensor([[tok for s in sessions for tok in s]])
            layout = SessionLayout.from_segments([[(len(s) - SUMMARY, SUMMARY, 0) for s in sessions]], ids.shape[1])
            hidden = model.model(input_ids=ids, session_layout=layout, position_ids=layout.position_ids(),
                                 use_cache=False).last_hidden_state
            positions = layout.pooling_positions()
            return hidden[positions[:, 0], positions[:, 1]]
        longest = max(len(s) for s in sessions)
        ids = torch.zeros(len(sessions), longest, dtype=torch.long)
        mask = torch.zeros(len(sessions), longest, dtype=torch.long)
        for i, s in enumerate(sessions):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(sessions)), last]


def _attn(method: str) -> str:
    return {"HF padded, eager": "eager", "HF padded, sdpa": "sdpa", "convret packed": "convret"}[method]


def peak_child(shape: dict, method: str, length: int) -> dict:
    model = build_model(shape, _attn(method))
    embed(model, method, sessions_for(16, 2, shape["vocab"]))  # library initialisation outside the peak
    sessions = sessions_for(length, shape["batch"], shape["vocab"])
    with H.PeakMemory("cpu") as peak:
        embed(model, method, sessions)
    return {"status": H.OK, "peak_above_model_bytes": peak.above_start_bytes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192",
                        help="longest session length N of each batch (default 512,...,8192)")
    parser.add_argument("--batch", type=int, default=4, help="sessions per batch: N, 3N/4, N/2, N/4 for 4 (4)")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model hidden size (256)")
    parser.add_argument("--layers", type=int, default=4, help="tiny model layers (4)")
    parser.add_argument("--vocab", type=int, default=32000, help="tiny model vocabulary (32000)")
    parser.add_argument("--core-only", action="store_true",
                        help="measure the core only and exit 0 even when convret.retrieval is missing")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")


def run(args, argv: list[str]) -> int:
    from .cli import EXIT_NO_RETRIEVAL

    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths, args.hidden, args.layers, args.vocab, args.reps, args.warmup = [64, 128], 64, 1, 1024, 2, 0
    elif args.quick:
        lengths, args.hidden, args.layers, args.reps, args.warmup = [256, 512, 1024, 2048], 128, 2, 3, 1
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": max(1, args.hidden // 64), "vocab": args.vocab,
             "batch": args.batch}
    payload: dict[str, Any] = {"benchmark": NAME, "command": H.command_line("convret bench", argv),
                               "environment": H.environment("cpu"), "shape": shape, "reps": args.reps,
                               "warmup": args.warmup, "results": [],
                               "gemm_ceiling": {"fp32": H.gemm_ceiling(torch.float32, "cpu",
                                                                       size=1024 if args.smoke else 2048)}}
    models = {m: build_model(shape, _attn(m)) for m in METHODS}
    for length in H.progress(lengths, "bench encode"):
        sessions = sessions_for(length, args.batch, args.vocab)
        real_tokens = sum(len(s) for s in sessions)
        embeddings = {m: embed(models[m], m, sessions) for m in METHODS}
        reference = embeddings["HF padded, eager"]
        times = H.interleaved_ms({m: (lambda m=m: embed(models[m], m, sessions)) for m in METHODS},
                                 reps=args.reps, warmup=args.warmup)
        records = {}
        for m in METHODS:
            ms = sorted(times[m])[len(times[m]) // 2]
            error = float((embeddings[m] - reference).abs().max() / reference.abs().max())
            records[m] = {"status": H.OK, "ms": ms, "runs_ms": times[m], "tokens_per_s": real_tokens / (ms / 1e3),
                          "relative_max_error_vs_eager": error, "passed": error <= 1e-4}
            if not args.no_memory:
                child = H.run_isolated("convret.bench.encode:peak_child", {"shape": shape, "method": m, "length": length})
                records[m]["peak_status"] = child["status"]
                records[m]["peak_above_model_bytes"] = child.get("peak_above_model_bytes")
        payload["results"].append({"length": length, "real_tokens": real_tokens,
                                   "padded_tokens": max(len(s) for s in sessions) * len(sessions), "methods": records})
    payload["passed"] = all(r["passed"] for res in payload["results"] for r in res["methods"].values())
    retrieval = importlib.util.find_spec("convret.retrieval") is not None
    payload["retrieval_encoder"] = ("convret.retrieval is installed; its encoder is not wired into this "
                                    "benchmark yet" if retrieval else "not run: convret.retrieval is not installed")
    payload["plots"] = [str(p) for p in make_plots(payload, args.out)]
    H.finish(args.out, NAME, payload, format_report(payload))
    if not payload["passed"]:
        return 1
    if not retrieval and not args.core_only:
        print("\nconvret bench encode: convret.retrieval is not installed, so the retrieval encoder's throughput "
              "was not measured (the measurement core above was). Exit code 3; --core-only exits 0.",
              file=__import__("sys").stderr)
        return EXIT_NO_RETRIEVAL
    return 0


def format_report(payload: dict) -> str:
    s = payload["shape"]
    lines = [f"Command: `{payload['command']}`", "", H.environment_line(payload["environment"]), "",
             f"Tiny Qwen2 (hidden {s['hidden']}, {s['layers']} layers), batches of {s['batch']} sessions of N, "
             f"3N/4, ... tokens + 3 summary tokens, no_grad, fp32. Time: median of {payload['reps']} side-by-side "
             "rounds; peak: fresh process, VmHWM above the model.", ""]
    rows = []
    for res in payload["results"]:
        for m, r in res["methods"].items():
            peak = r.get("peak_above_model_bytes")
            rows.append([res["length"], m, H.fmt_ms(r["ms"]), f"{r['tokens_per_s']:.0f}",
                         "OOM" if r.get("peak_status") == H.OOM else H.fmt_mib(peak),
                         f"{'pass' if r['passed'] else 'FAIL'} ({r['relative_max_error_vs_eager']:.0e})"])
    lines.append(H.markdown_table(["N", "method", "batch time", "real tokens/s", "peak memory",
                                   "embeddings vs HF eager"], rows))
    lines += ["", f"Retrieval encoder: {payload['retrieval_encoder']}."]
    return "\n".join(lines)


def make_plots(payload: dict, out_dir) -> list:
    plots = []
    for key, ylabel, scale, suffix in (("tokens_per_s", "real tokens / s", 1, "throughput"),
                                       ("peak_above_model_bytes", "peak memory above the model (MiB)", 2**20, "memory")):
        series: dict[str, list] = {}
        for res in payload["results"]:
            for m, r in res["methods"].items():
                v = r.get(key)
                series.setdefault(m, []).append((res["length"], None if v is None else v / scale))
        if any(y is not None for pts in series.values() for _, y in pts):
            plots.append(H.plot_lines(f"{out_dir}/encode_{suffix}.png", series, "longest session N (tokens)",
                                      ylabel, f"embedding sessions ({suffix})"))
    return plots
