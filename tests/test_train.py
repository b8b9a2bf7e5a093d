"""convret.train: the Trainer subclass, checkpoints, resume (also after SIGKILL), NaN stop, LoRA summary rows,
arguments and configs. Tiny models, a handful of steps."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tiny import word_tokenizer
from _train_world import WordFormatter, make_examples, tiny_model_config

DRIVER = Path(__file__).resolve().parent / "_train_driver.py"
COMMON = ["--max_session_len", "48", "--max_passage_len", "16", "--max_response_len", "16",
          "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--num_negatives", "2",
          "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--warmup_steps", "0",
          "--temperature", "0.05"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok = word_tokenizer()
    tok.save_pretrained(root / "tok")
    tiny_model_config(root / "model.json", len(tok) + 8)
    return root


def _args(world, out, *flags):
    from convret.train.arguments import parse_arguments

    return parse_arguments(["--model_config", str(world / "model.json"), "--tokenizer_name_or_path",
                            str(world / "tok"), "--output_dir", str(out), *COMMON, *flags])


def _run(world, out, *flags, examples=None, callbacks=(), triplets=False, negatives=None):
    from convret.train.main import run
    from convret.train.model import build_model

    m, d, l, t = _args(world, out, *flags)
    built = build_model(m, d, l)
    examples = examples or make_examples(24, negatives=d.num_negatives if negatives is None else negatives,
                                         triplets=triplets)
    if callbacks:
        import convret.train.main as main_module

        original = main_module.build_trainer

        def with_callbacks(*a, **k):
            trainer = original(*a, **k)
            for cb in callbacks:
                trainer.add_callback(cb)
            return trainer

        main_module.build_trainer = with_callbacks
        try:
            return run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built)
        finally:
            main_module.build_trainer = original
    return run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(directory / name)


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_checkpoints_are_retriever_checkpoints_and_log(world, tmp_path):
    from convret.train import load_retriever

    out = tmp_path / "run"
    assert _run(world, out, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4", "final", "init", "log.jsonl"]
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        for f in ("convret_config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                  "rng_state.pth", "trainer_state.json"):
            assert (out / ckpt / f).is_file(), (ckpt, f)
    loaded = load_retriever(out / "checkpoint-4")
    assert loaded.config.summary_token_ids == [loaded.tokenizer.convert_tokens_to_ids(t)
                                               for t in loaded.config.summary_tokens]
    assert _max_diff(_weights(out / "checkpoint-4"), _weights(out / "final")) == 0.0
    assert _max_diff(_weights(out / "init"), _weights(out / "final")) > 1e-4  # it trained
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        for key in ("step", "loss", "contrastive", "generation", "lr", "grad_norm", "tokens_per_s", "fill"):
            assert key in r, key
        assert abs(r["loss"] - (r["contrastive"] + 0.2 * r["generation"])) < 1e-4 * max(1.0, r["loss"])
    # a rerun of the finished run (--resume auto) trains no further step and leaves the weights as they were
    final_before = _weights(out / "final")
    assert _run(world, out, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--resume", "auto") == 0
    assert sorted(p.name for p in out.iterdir()) == names
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert _max_diff(final_before, _weights(out / "final")) == 0.0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # no silent resume: --resume none on a directory with checkpoints is an error, --overwrite_output_dir clears
    from convret.train.main import prepare_output_dir

    _, _, _, t = _args(world, out, "--resume", "none")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        prepare_output_dir(t, True)
    _, _, _, t = _args(world, out, "--resume", "auto")
    assert prepare_output_dir(t, True) == str(out / "checkpoint-4")
    _, _, _, t = _args(world, out, "--overwrite_output_dir", "true")
    assert prepare_output_dir(t, True) is None
    assert sorted(p.name for p in out.iterdir()) == []


def test_lora_summary_rows_train_frozen_rows_do_not_and_lora_resume(world, tmp_path):
    from convret.train import load_retriever

    flags = ["--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1",
             "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-2", "--save_steps", "2"]
    out = tmp_path / "lora"
    assert _run(world, out, "--max_steps", "4", *flags) == 0
    init = load_retriever(out / "init", merge=True)
    final = load_retriever(out / "final", merge=True)
    ids = final.config.summary_token_ids
    before = init.model.get_input_embeddings().weight
    after = final.model.get_input_embeddings().weight
    frozen = torch.ones(before.shape[0], dtype=torch.bool)
    frozen[ids] = False
    assert float((after[ids] - before[ids]).abs().max()) > 1e-4, "summary rows did not train"
    assert torch.equal(after[frozen], before[frozen]), "frozen embedding rows changed"
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "final" / "base").is_dir()

    # resuming the LoRA run from its checkpoint-2 ends where the uninterrupted run ended
    resumed = tmp_path / "lora_resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert _run(world, resumed, "--max_steps", "4", *flags, "--resume", "auto") == 0
    assert _max_diff(_weights(out / "final"), _weights(resumed / "final")) <= 1e-6


def test_nonfinite_loss_stops_with_step_parts_and_last_good_checkpoint(world, tmp_path, capsys):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    out = tmp_path / "nan"
    rc = _run(world, out, "--max_steps", "6", "--save_steps", "2", callbacks=[Poison()])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err and "contrastive=" in err and "generation=" in err
    assert str(out / "checkpoint-2") in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    weights = _weights(out / "checkpoint-2")
    assert all(torch.isfinite(w).all() for w in weights.values())
    from convret.train import load_retriever

    load_retriever(out / "checkpoint-2")


def _driver(world, out, *flags, env=None, timeout=300, opts=(), mixture=None):
    opts = [*opts, "--mixture", mixture] if mixture else list(opts)
    cmd = [sys.executable, str(DRIVER), str(world), *opts, "--", "--output_dir", str(out), *COMMON, *flags]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_moments_and_during_save_then_resume_is_exact(world, tmp_path):
    """Uninterrupted run vs a run killed during the save of checkpoint-4 and at a random moment later, each time
    resumed with --resume auto: same final weights. 8 steps of 4 over 24 examples cross an epoch boundary
    (the per-epoch shuffle is replayed); LoRA dropout 0.1 needs the RNG restored; each example has 5 hard
    negatives of which 2 are sampled per epoch (the draws are replayed too)."""
    flags = ["--max_steps", "8", "--save_steps", "2", "--lora", "true", "--lora_r", "4", "--lora_alpha", "8",
             "--lora_dropout", "0.1", "--lora_target_modules", "q_proj", "v_proj", "--seed", "7",
             "--num_negatives", "2", "--sample_negatives", "true"]
    reference = tmp_path / "reference"  # in this process: the same code path as the driver's
    assert _run(world, reference, *flags, negatives=5) == 0

    out = tmp_path / "killed"
    proc = _driver(world, out, *flags, env={"CONVRET_TEST_KILL_IN_SAVE": "4"}, opts=("--negatives", "5"))
    assert proc.wait(300) == -signal.SIGKILL
    assert (out / ".staging-4").is_dir(), "the kill should have hit the save of checkpoint-4"
    assert not (out / "checkpoint-4").exists()
    rng = random.Random(1)
    kills = 0
    for attempt in range(6):
        proc = _driver(world, out, *flags, "--resume", "auto", opts=("--negatives", "5"))
        if attempt == 0:  # let it load, then kill it at a random moment of its training
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-4").exists():
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        rc = proc.wait(300)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, proc.stderr.read()
    assert rc == 0 and kills == 1
    assert (out / "final").is_dir()
    diff = _max_diff(_weights(reference / "final"), _weights(out / "final"))
    assert diff <= 1e-6, diff


def test_arguments_configs_and_unknown_keys(tmp_path):
    from convret.train.arguments import CONFIG_DIR, load_config, parse_arguments

    for name in ("tiny.yaml", "chatretriever-qwen-7b.yaml", "uniconv-mistral-7b.yaml"):
        m, d, l, t = parse_arguments([], CONFIG_DIR / name)
        assert t.output_dir and t.max_steps > 0
    m, d, l, t = parse_arguments([], CONFIG_DIR / "chatretriever-qwen-7b.yaml")
    assert (t.per_device_train_batch_size * 8, t.gradient_accumulation_steps, t.learning_rate, t.max_steps) == \
        (64, 4, 1e-4, 2500) or (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (8, 4)
    assert (m.lora, m.lora_r, m.lora_alpha, m.lora_dropout) == (True, 32, 64, 0.1)
    assert (d.max_session_len, d.max_passage_len, l.recipe, l.alpha, l.temperature, l.label_smoothing) == \
        (1024, 384, "csit", 0.2, 0.01, 0.1)
    m, d, l, t = parse_arguments([], CONFIG_DIR / "uniconv-mistral-7b.yaml")
    assert l.recipe == "uniconv" and "mistral" in m.model_name_or_path.lower()
    # flags override config fields; recipe defaults fill what is unset
    m, d, l, t = parse_arguments(["--max_steps", "7", "--recipe", "uniconv", "--seed", "3"])
    assert (t.max_steps, t.seed, l.recipe) == (7, 3, "uniconv")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown key 'max_step' \\(did you mean max_steps\\?\\)"):
        load_config(bad)
    with pytest.raises(ValueError, match="unknown option --max_stepz \\(did you mean --max_steps\\?\\)"):
        parse_arguments(["--max_stepz", "3"])
    with pytest.raises(ValueError, match="unknown recipe"):
        parse_arguments(["--recipe", "nope"])


def test_gradcache_through_the_trainer_matches_the_plain_step(world, tmp_path):
    flags = ["--max_steps", "3", "--save_steps", "100", "--logging_steps", "1", "--learnable_temperature", "true"]
    assert _run(world, tmp_path / "plain", *flags) == 0
    assert _run(world, tmp_path / "cached", *flags, "--gradcache_chunk_rows", "1") == 0
    a, b = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "cached" / "final")
    flat_a = torch.cat([a[k].reshape(-1) for k in a])
    flat_b = torch.cat([b[k].reshape(-1) for k in a])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) <= 1e-4
    logs = [json.loads(x) for x in (tmp_path / "cached" / "log.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert abs(logs[0]["loss"] - plain[0]["loss"]) <= 1e-4 * abs(plain[0]["loss"])


def test_uniconv_trains_on_triplets_with_cii_term(world, tmp_path):
    out = tmp_path / "uniconv"
    flags = ["--recipe", "uniconv", "--max_steps", "12", "--save_steps", "100", "--logging_steps", "4",
             "--learning_rate", "3e-3", "--num_negatives", "2"]
    assert _run(world, out, *flags, triplets=True) == 0
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for r in logs:
        assert {"contrastive", "generation", "cii"} <= set(r)
        assert abs(r["loss"] - (r["contrastive"] + r["generation"] + 0.5 * r["cii"])) < 1e-4 * max(1.0, r["loss"])
    assert logs[-1]["loss"] < logs[0]["loss"]
    from convret.train import load_retriever

    assert load_retriever(out / "final").config.recipe == "uniconv"


@pytest.mark.parametrize("flags, expected", [((), True), (("--cpu_caching_allocator", "false"), False)],
                         ids=["default", "off"])
def test_cpu_training_uses_the_caching_allocator_unless_turned_off(world, tmp_path, flags, expected):
    """`convret train` on CPU runs its steps with convret's caching allocator (what `convret bench step`'s
    "convret as shipped" row measures); --cpu_caching_allocator false keeps torch's; either way the process
    has torch's allocator back after run()."""
    from transformers import TrainerCallback

    from convret.ops.session_attention.cpu import native_available
    from convret.memory import cpu_caching_allocator_stats

    if not native_available():
        pytest.skip("the caching allocator is part of the native extension, which is not built")
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(cpu_caching_allocator_stats().active)

    assert not cpu_caching_allocator_stats().active
    assert _run(world, tmp_path / "run", "--max_steps", "2", *flags, callbacks=[Probe()]) == 0
    assert seen == [expected, expected]
    assert not cpu_caching_allocator_stats().active



def test_a_model_given_by_flag_brings_its_own_tokenizer():
    """`convret train --model_name_or_path DIR` (no config) must not keep the embedded default's tokenizer."""
    from convret.train.arguments import parse_arguments

    model_args, *_ = parse_arguments(["--model_name_or_path", "/models/Qwen2.5-7B-Instruct"])
    assert model_args.tokenizer_name_or_path is None
    model_args, *_ = parse_arguments(["--model_name_or_path=/m", "--tokenizer_name_or_path", "/t"])
    assert model_args.tokenizer_name_or_path == "/t"
    model_args, *_ = parse_arguments([])
    assert model_args.tokenizer_name_or_path.endswith("tokenizer")
