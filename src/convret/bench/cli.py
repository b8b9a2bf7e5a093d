"""``convret bench SUBCOMMAND``: every baseline side by side on this machine; tables, JSON and plots.

Every subcommand prints a markdown table on stdout and writes ``--out/NAME.json`` (device, versions, CPU
flags, shapes, every measurement, the in-run GEMM ceiling), ``--out/NAME.md`` and PNG plots.

Exit codes: 0 done (and every numerical check passed); 1 a numerical check failed (for ``encode``: convret's
encoder and the plain HF way give different embeddings; for ``serve``: the incremental and the full encode differ,
or a request failed); 2 bad usage; 3 ``step``: the checks passed, but the per-round speed-ups disagree by more
than ``--max-round-spread``, so no headline figure was written; 4 ``gpu-check``: nothing failed, but the CUDA checks could not run (no CUDA device).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from .._args import parse

# subcommand -> (module, one-line summary); the module has add_arguments(parser) and run(args, argv) -> int
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "attention": ("convret.bench.attention", "session attention vs dense eager, SDPA, FlexAttention, flash-attn"),
    "loss": ("convret.bench.loss", "InfoNCE vs naive logits; LM loss vs full-logit cross-entropy"),
    "step": ("convret.bench.step", "the CSIT training step: reference vs convret, with an ablation of its parts"),
    "trainer-overhead": ("convret.bench.trainer_overhead",
                         "a ConvretTrainer step vs the bare CSITLoss step it wraps: the Trainer's own cost"),
    "tile-gemm": ("convret.bench.tile_gemm",
                  "native CPU attention with each tile GEMM forced (mkl, onednn, upcast, packed) vs the peers"),
    "encode": ("convret.bench.encode", "convret's retrieval encoder vs plain HF: passages/s, peak memory per session length"),
    "serve": ("convret.bench.serve", "incremental session encoder vs full re-encode per turn; the service's req/s"),
    "cached-prefill": ("convret.bench.cached_prefill",
                       "the cached prefill (serving) on CPU: native kernel vs the SDPA loop, attention and end to end"),
    "retrieval": ("convret.bench.retrieval", "encode, index (Flat/IVF/HNSW/IVF-PQ), search at scale: rate, peak RSS, recall"),
    "recipe": ("convret.bench.recipe",
               "the demo's training recipe part by part (mined negatives, ad hoc queries, ...), over seeds"),
    "gpu-report": ("convret.bench.gpu_report", "AOT compile report, occupancy estimate, tile-skip fractions"),
    "gpu-check": ("convret.bench.gpu_check", "on CUDA: every kernel vs its oracle in fp16/bf16/fp32, then timings"),
}

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_NO_HEADLINE, EXIT_NO_CUDA = 0, 1, 2, 3, 4


def common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--out", default="bench-results",
                       help="folder for NAME.json, NAME.md and the PNG plots (default ./bench-results)")
    group.add_argument("--quick", action="store_true", help="small sizes: about a minute on a 2-core CPU")
    group.add_argument("--smoke", action="store_true",
                       help="tiny sizes that only prove the command works (CI); the numbers mean nothing")
    group.add_argument("--reps", type=int, default=5, help="timed runs (rounds) per measurement, median (5)")
    group.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (2)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda when available)")
    group.add_argument("--max-memory-gib", type=float, default=None,
                       help="memory guard: a peer whose estimated need exceeds it is reported as OOM without "
                            "running (default: 80%% of the available host / free device memory)")
    group.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: convret bench SUBCOMMAND [options]   (convret bench SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines) + "\n\n" + __doc__.split("\n\n", 1)[1].strip()


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return EXIT_OK
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv:
            print(f"convret bench: unknown subcommand {argv[0]!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"convret bench {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    common_arguments(parser)
    args = parse(parser, rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available() and name != "gpu-check":
        print("convret bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(args.out, exist_ok=True)
    return int(module.run(args, [name, *rest]) or 0)
