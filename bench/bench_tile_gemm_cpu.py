"""Which 16-bit tile GEMM the native CPU kernels should use: now ``convret bench tile-gemm`` (one copy of the
measuring code, in convret.bench.tile_gemm, which also replaces bench_bf16_paths_cpu.py).

    python bench/bench_tile_gemm_cpu.py [options of convret bench tile-gemm]

is ``convret bench tile-gemm [options]``: each tile GEMM forced, the peers, the backward schedules, the in-run
GEMM ceiling; ``--quick`` is the old ``--quick`` (session 256, response 96).
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["tile-gemm", *sys.argv[1:]]))
