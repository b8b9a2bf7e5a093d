"""Benchmarks of convret against its peers (``convret bench --help``).

Every measurement is one ``convret bench`` subcommand (:mod:`convret.bench.cli`), and every one takes its timing
and memory helpers from :mod:`convret.bench.harness`. The ``bench_*.py`` scripts in the repository's
``bench/`` folder are one-line wrappers that run a subcommand (``python bench/bench_attention_cpu.py`` = ``convret bench attention
--device cpu``); ``bench/micro`` holds the pytest-benchmark micro-benchmarks (``make bench-micro``).
"""
