"""Session attention on CPU against its peers: now ``convret bench attention --device cpu`` (one copy of the
measuring code, in convret.bench.attention).

    python bench/bench_attention_cpu.py [options of convret bench attention]

is ``convret bench attention --device cpu [options]``. The old script's options are gone: ``--layouts`` is
``--sessions`` / ``--responses`` / ``--packed-len``, ``--json FILE`` is ``--out DIR``, ``--no-flex`` is ``--peers``;
the one-shape side-by-side runs on one thread in process CPU time (``--cpu-time``) are
``convret bench tile-gemm --cpu-time --dtypes fp32`` (convret, the SDPA decomposition and FlexAttention).
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["attention", "--device", "cpu", *sys.argv[1:]]))
