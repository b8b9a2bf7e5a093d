"""The Trainer's own cost: now ``convret bench trainer-overhead`` (one copy of the measuring code, in
convret.bench.trainer_overhead).

    python bench/bench_trainer_overhead.py [options of convret bench trainer-overhead]

is ``convret bench trainer-overhead [options]`` (``--scale 0.25`` and ``--reps`` replace the old ``--steps``).
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["trainer-overhead", *sys.argv[1:]]))
