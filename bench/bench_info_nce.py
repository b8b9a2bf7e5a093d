"""InfoNCE on CPU, naive logits vs ``convret.info_nce``: now ``convret bench loss --only info_nce`` (one copy
of the measuring code, in convret.bench.loss).

    python bench/bench_info_nce.py [options of convret bench loss]

is ``convret bench loss --only info_nce [options]``: time side by side and peak memory in fresh processes over
a sweep of query counts (``--queries``, ``--group-size``, ``--dim``); ``--repeats`` is ``--reps``, the old ``--big``
is ``--queries 8192,32768``.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["loss", "--only", "info_nce", *sys.argv[1:]]))
