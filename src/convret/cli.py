"""Command line: ``convret COMMAND [options]`` (also ``python -m convret COMMAND``).

Each command lives in its own module and is imported only when it runs, so that ``convret --help`` and the
light commands never pay for transformers, faiss or the kernels. A command module exposes
``main(argv: list[str]) -> int``.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line summary); the module's main(argv) does the work
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("convret.data.cli", "data files: `convret data check FILE` validates one (formats, bad records)"),
    "demo": ("convret.demo", "session attention on a CSIT batch, time and memory beside the dense-mask baselines"),
    "encode": ("convret.retrieval.encode", "embed a collection or conversation sessions with a checkpoint"),
    "index": ("convret.retrieval.index", "build a faiss inner-product index over an embedding directory"),
    "search": ("convret.retrieval.search", "top-k passages per query embedding, written as a TREC run"),
    "mine": ("convret.retrieval.mine", "hard negatives for a training file from a retriever's rank window (bm25 / dense)"),
    "eval": ("convret.retrieval.metrics", "NDCG/MRR/MAP/Recall of a TREC run against qrels (pytrec_eval, -c)"),
    "evaluate": ("convret.retrieval.evaluate", "the whole chain from a checkpoint: encode, index, search, metrics"),
    "export": ("convret.retrieval.export", "write a sentence-transformers model directory from a checkpoint"),
    "generate": ("convret.retrieval.generate", "responses from the model (UniConv), ROUGE-L and token F1"),
    "serve": ("convret.serve.main", "conversational search over HTTP, each new turn encoded on the cached session"),
    "bench": ("convret.bench.cli", "benchmarks vs every peer (attention, loss, step, encode, gpu-report, gpu-check)"),
    "train": ("convret.train.main", "train a conversational retriever (CSIT / UniConv) with the HF Trainer"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: convret COMMAND [options]   (convret COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"convret: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
