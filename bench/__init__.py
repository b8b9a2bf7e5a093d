"""Benchmarks of convret against its peers, installed as ``convret.bench`` (``convret bench --help``).

Every measurement is one ``convret bench`` subcommand (:mod:`convret.bench.cli`), and every one takes its timing
and memory helpers from :mod:`convret.bench.harness`. The ``bench_*.py`` scripts that remain in this folder are
one-line wrappers that run a subcommand (``python bench/bench_attention_cpu.py`` = ``convret bench attention
--device cpu``); ``bench/micro`` holds the pytest-benchmark micro-benchmarks (``make bench-micro``).
"""
