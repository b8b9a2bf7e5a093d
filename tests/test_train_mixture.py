"""Training on a mixture of sources (convret.train.mixture): homogeneous batches in the weights' proportions,
per-source counts in log.jsonl, exact resume after SIGKILL, train_files in the YAML config and as a flag."""
from __future__ import annotations

import json
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
        keys = list(sampler)
        assert all(e == epoch for e, _ in keys)
        order = [i for _, i in keys]
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
    assert [i for _, i in again] != [i for _, i in sampler]


def test_mixture_items_sample_negatives_per_epoch_like_a_single_file():
    """Each source's examples go through TrainingDataset: (epoch, index) decides the negatives drawn."""
    mixture = make_mixture(make_examples(10, negatives=3), [1, 1], negatives=3)
    mixture.configure(num_negatives=1, seed=5)
    assert len(mixture) == 15 and mixture[12][0] == 1 and mixture[12][1].id == "bc2_1"
    draws = {(epoch, i): [n.id for n in mixture[(epoch, i)][1].negatives] for epoch in range(6) for i in range(15)}
    assert all(len(v) == 1 for v in draws.values())
    assert draws == {(epoch, i): [n.id for n in mixture[(epoch, i)][1].negatives] for epoch, i in draws}
    assert any(len({draws[(e, i)][0] for e in range(6)}) > 1 for i in range(15))
    mixture.configure(num_negatives=1, seed=5, sample=False)
    assert all(mixture[(e, 3)][1].negatives == mixture[(0, 3)][1].negatives[:1] for e in range(6))


def test_training_logs_per_source_counts_in_the_configured_proportions(world, tmp_path):  # noqa: F811
    """Weights 0.25 / 0.75 over sources of 24 and 12 examples (the weights, not the sizes, decide), batches of 4:
    an epoch is 9 batches, 2 from a (2.25 rounded) and 7 from b (6.75). Logging every step shows each batch
    homogeneous (4 + 0); the counts are stratified, so the bound is exact per epoch: after 9 and 18 steps a has
    8 and 16 examples, b 28 and 56 (each within one batch of weight x batches, here 0.25 x 9 x 4 = 9 examples)."""
    out = tmp_path / "run"
    first = make_examples(24, negatives=2)
    mixture = make_mixture(first, [0.25, 0.75], negatives=2)
    assert _run(world, out, "--max_steps", "18", "--logging_steps", "1", examples=mixture) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 19))
    assert all(sorted([r["examples/a"], r["examples/b"]]) == [0, 4] for r in logs)  # one source per batch
    for steps, a, b in ((9, 8, 28), (18, 16, 56)):
        assert sum(r["examples/a"] for r in logs[:steps]) == a
        assert sum(r["examples/b"] for r in logs[:steps]) == b
        assert abs(a - 0.25 * steps * 4) <= 4 and abs(b - 0.75 * steps * 4) <= 4


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


def test_convret_train_reads_train_files_from_disk(tmp_path, capsys):
    """The command itself on the sample world's two training files (the ad-hoc one mined by BM25 first), with
    the embedded default's tiny model: both sources are read with their formats, counted and reported."""
    pytest.importorskip("bm25s")
    from convret.data import sample_world as sw
    from convret.retrieval.mine import main as mine_main
    from convret.train.main import main

    world = Path(sw.SAMPLE_WORLD_DIR)
    mined = tmp_path / "adhoc.jsonl"
    assert mine_main(["--train-file", str(world / sw.TRAIN_ADHOC), "--corpus", str(world / sw.COLLECTION),
                      "--retriever", "bm25", "--output", str(mined), "--num-negatives", "1", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["--train_files", f"{world / sw.TRAIN_ULTRACHAT}:0.5,{mined}:0.5:tevatron", "--max_examples", "40",
                 "--max_steps", "10", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps",
                 "100", "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {k for k in logs[0] if k.startswith("examples/")} == {"examples/train", "examples/adhoc"}
    # 80 examples in batches of 8: one epoch of 10 batches, 5 from each source
    assert sum(r["examples/train"] for r in logs) == sum(r["examples/adhoc"] for r in logs) == 40
    assert "examples per source in this run: train 40 (50.0%), adhoc 40 (50.0%)" in capsys.readouterr().err
