"""The cached prefill on CPU: now ``convret bench cached-prefill`` (one copy of the measuring code, in
convret.bench.cached_prefill).

    python bench/bench_cached_prefill_cpu.py [options of convret bench cached-prefill]

is ``convret bench cached-prefill [options]``: ``cached_session_attention`` on the native kernel beside the SDPA
loop at serving shapes, and the session encoder end to end on each.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["cached-prefill", *sys.argv[1:]]))
