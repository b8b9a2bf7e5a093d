"""Benchmarks of convret against its peers, installed as ``convret.bench`` (``convret bench --help``).

The scripts in this folder also run on their own (``python bench/bench_attention_cpu.py``). Every one of them
takes its timing and memory helpers from :mod:`convret.bench.harness`.
"""
