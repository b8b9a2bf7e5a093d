"""bf16 session attention with each tile GEMM / path forced, beside the peers: now ``convret bench tile-gemm``
(one copy of the measuring code, in convret.bench.tile_gemm).

    python bench/bench_bf16_paths_cpu.py [options of convret bench tile-gemm]

is ``convret bench tile-gemm [options]``; the old ``--bwd`` is the default now (``--no-backward`` turns it off),
``--hq`` / ``--hkv`` are ``--q-heads`` / ``--kv-heads``, ``--peers sdpa,flex`` is ``--peers sdpa-decomposition,flex``;
``--cpu-time`` and ``--tiles`` are as before.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["tile-gemm", *sys.argv[1:]]))
