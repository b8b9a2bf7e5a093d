"""Encoding benchmark: now ``convret bench encode`` (one copy of the measuring code, in convret.bench.encode).

    python bench/bench_encode.py [options of convret bench encode]

is ``convret bench encode [options]``: convret's retrieval encoder (``embed_sequences``, the code
``convret encode`` runs) against the plain HF way (padded batches, SDPA, output_hidden_states): passages/s side
by side in one process, an embedding-equality check, and peak memory of one 4k..32k-token session in fresh
processes.
"""
import sys

from convret.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
