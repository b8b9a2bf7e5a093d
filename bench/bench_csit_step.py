"""One CSIT training step, reference vs convret: now ``convret bench step`` (one copy of the measuring code, in
convret.bench.step), which adds an ablation of convret's parts.

    python bench/bench_csit_step.py [options of convret bench step]

is ``convret bench step [options]``. The old ``--malloc default|mmap|caching`` modes are gone: the ablation's
last row ("+ caching allocator (= convret)") measures the allocator, every row in a fresh process for its peak;
``--steps`` is ``--reps``, ``--no-peaks`` is ``--no-memory``.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["step", *sys.argv[1:]]))
