"""Training on a mixture of sources (convret.train.mixture): homogeneous batches in the weights' proportions,
per-source counts in log.jsonl, exact resume after SIGKILL, train_files in the YAML config and as a flag."""
from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path

import pytest

from convret.train.mixture import MixtureSampler, parse_train_files, stratified_counts

from _train_world import make_examples, make_mixture
from test_train import _driver, _max_diff, _run, _weights, world  # noqa: F401  (the module fixture)


def test_sampler_blocks_are_homogeneous_stratified_and_seeded():
    sizes, weights, batch = [50, 13, 30], [0.5, 0.3, 0.2], 4
    sampler = MixtureSampler(sizes, weights, batch, seed=3)
    offsets = [0, 50, 63]
    source_of = lambda i: max(s for s in range(3) if offsets[s] <= i)  # noqa: E731
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == (93 // batch) * batch
        blocks = [order[k : k + batch] for k in range(0, len(order), batch)]
        sources = [{source_of(i) for i in block} for block in blocks]
        assert all(len(s) == 1 for s in sources)  # one source per batch
        counts = [sum(1 for s in sources if s == {k}) for k in range(3)]
        assert counts == stratified_counts(weights, 23)
        assert all(abs(c - w * 23) < 1 for c, w in zip(counts, weights))
        # source 1 (13 examples, 30 % of 23 batches = 28 examples) is oversampled: every example at least twice
        drawn = [i for block, s in zip(blocks, sources) if s == {1} for i in block]
        assert set(drawn) == set(range(50, 63))
    sampler.set_epoch(1)
    again = MixtureSampler(sizes, weights, batch, seed=3)
    again.set_epoch(1)
    assert list(again) == list(sampler)
    again.set_epoch(2)
    assert list(again) != list(sampler)


def test_training_logs_per_source_counts_in_the_configured_proportions(world, tmp_path):  # noqa: F811
    """Weights 0.7 / 0.3, 24 + 12 examples, batches of 4: an epoch is 9 batches, 6 from a (6.3 rounded) and 3
    from b. 18 steps = 2 epochs: the totals are exact (a: 48 examples, b: 24); each 3-step log window is a draw
    without replacement from its epoch, checked within 4 standard deviations of the hypergeometric law."""
    out = tmp_path / "run"
    first = make_examples(24, negatives=2)
    mixture = make_mixture(first, [0.7, 0.3], negatives=2)
    assert _run(world, out, "--max_steps", "18", "--logging_steps", "3", examples=mixture) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [3, 6, 9, 12, 15, 18]
    assert all(r["examples/a"] + r["examples/b"] == 12 for r in logs)
    assert sum(r["examples/a"] for r in logs) == 48 and sum(r["examples/b"] for r in logs) == 24
    n, big, good = 3, 9, 6  # batches per window, per epoch, of source a per epoch
    sd = math.sqrt(n * good / big * (1 - good / big) * (big - n) / (big - 1))
    for r in logs:
        assert abs(r["examples/a"] / 4 - n * good / big) <= 4 * sd + 1e-9


def test_mixture_resume_after_sigkill_is_exact(world, tmp_path):  # noqa: F811
    flags = ["--max_steps", "8", "--save_steps", "2", "--logging_steps", "2", "--seed", "7"]
    reference = tmp_path / "reference"
    mixture = make_mixture(make_examples(24, negatives=2), [0.6, 0.4], negatives=2)
    assert _run(world, reference, *flags, examples=mixture) == 0

    out = tmp_path / "killed"
    proc = _driver(world, out, *flags, env={"CONVRET_TEST_KILL_IN_SAVE": "4"}, mixture="0.6,0.4")
    assert proc.wait(300) == -signal.SIGKILL
    proc = _driver(world, out, *flags, "--resume", "auto", mixture="0.6,0.4")
    assert proc.wait(300) == 0, proc.stderr.read()
    assert _max_diff(_weights(reference / "final"), _weights(out / "final")) <= 1e-6
    keys = lambda path: [(r["step"], r["examples/a"], r["examples/b"])  # noqa: E731
                         for r in map(json.loads, (path / "log.jsonl").read_text().splitlines())]
    assert keys(out) == keys(reference)


def test_train_files_from_yaml_and_flag(tmp_path):
    from convret.train.arguments import parse_arguments

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _, d, _, _ = parse_arguments(["--train_files", f"{a}:0.7,{b}:0.3:tevatron", "--output_dir", str(tmp_path)])
    sources = parse_train_files(d.train_files)
    assert [(s.path, s.weight, s.format, s.name) for s in sources] == [(str(a), 0.7, "auto", "a"),
                                                                       (str(b), 0.3, "tevatron", "b")]
    config = tmp_path / "mix.yaml"
    config.write_text(f"train_files:\n  - {{path: {a}, weight: 3, name: chat}}\n  - path: resources:sample_world/"
                      "train.jsonl\n    format: ultrachat\noutput_dir: runs/x\n")
    _, d, _, _ = parse_arguments([], config)
    from convret.train.arguments import CONFIG_DIR

    sources = parse_train_files(d.train_files, CONFIG_DIR.parent)
    assert [(s.name, s.weight, s.format) for s in sources] == [("chat", 3.0, "auto"), ("train", 1.0, "ultrachat")]
    assert Path(sources[1].path).is_file()
    for bad, message in ((["--train_file", str(a), "--train_files", f"{b}:1"], "exclude each other"),
                         (["--train_files", f"{a}:0"], "must be positive"),
                         (["--train_files", f"{a}:1,{a}:2"], "repeat")):
        with pytest.raises(ValueError, match=message):
            parse_arguments([*bad, "--output_dir", str(tmp_path)])
