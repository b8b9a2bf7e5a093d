"""convret train on the settings real runs use: mixed precision taking effect, GradCache under gradient
accumulation (through the Trainer's accelerator.backward), negatives sampled per epoch, the ChatRetriever
separator recorded in the checkpoint. Tiny models, one or two steps each."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from _train_world import WordFormatter, make_examples
from test_train import _args, _max_diff, _weights, world  # noqa: F401  (world: the module's fixture)


def _train(world, out, *flags, examples=None, negatives=2, setup=None, callback=None):  # noqa: F811
    """``convret.train.main.run`` on the test world; ``setup(model)`` edits the built model first,
    ``callback(trainer)`` returns a TrainerCallback added to the Trainer."""
    import convret.train.main as main_module
    from convret.train.model import build_model

    m, d, l, t = _args(world, out, *flags)
    built = build_model(m, d, l)
    if setup is not None:
        setup(built.model)
    examples = examples or make_examples(24, negatives=negatives)
    original = main_module.build_trainer

    def with_callback(*a, **k):
        trainer = original(*a, **k)
        if callback is not None:
            trainer.add_callback(callback(trainer))
        return trainer

    main_module.build_trainer = with_callback
    try:
        return main_module.run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built)
    finally:
        main_module.build_trainer = original


# ---------------------------------------------------------------------------------------------- mixed precision
class _MatmulDtypes(TrainerCallback):
    """Records the output dtype of the model's q_proj (a matmul of the training forward) during training."""

    def __init__(self, trainer):
        self.dtypes: set[torch.dtype] = set()
        module = next(m for name, m in trainer.model.named_modules() if name.endswith("q_proj"))
        module.register_forward_hook(lambda mod, inp, out: self.dtypes.add(out.dtype))
        self.trainer = trainer
        _MatmulDtypes.last = self


@pytest.mark.parametrize("mode,expected", [("bf16", torch.bfloat16), ("no", torch.float32),
                                           ("auto", torch.float32)])
def test_mixed_precision_field_sets_the_training_autocast(world, tmp_path, mode, expected):  # noqa: F811
    """--mixed_precision decides the Accelerator's autocast: a matmul of the training forward is bf16 under
    bf16 (on the CPU too); auto on a machine without a CUDA GPU trains in fp32 (docs/train.md)."""
    if mode == "auto" and torch.cuda.is_available():
        pytest.skip("auto on the CPU only")
    flags = ["--max_steps", "1", "--save_steps", "100", "--mixed_precision", mode]
    assert _train(world, tmp_path / mode, *flags, callback=_MatmulDtypes) == 0
    grabbed = _MatmulDtypes.last
    assert grabbed.dtypes == {expected}
    assert grabbed.trainer.accelerator.mixed_precision == {torch.bfloat16: "bf16", torch.float32: "no"}[expected]
    # the weights stay fp32 (autocast, not a cast of the model)
    assert all(p.dtype == torch.float32 for p in grabbed.trainer.model.parameters())


def test_bf16_and_fp32_runs_from_one_seed_differ(world, tmp_path):  # noqa: F811
    flags = ["--max_steps", "2", "--save_steps", "100"]
    assert _train(world, tmp_path / "fp32", *flags, "--mixed_precision", "no") == 0
    assert _train(world, tmp_path / "fp32b", *flags, "--mixed_precision", "no") == 0
    assert _train(world, tmp_path / "bf16", *flags, "--mixed_precision", "bf16") == 0
    fp32, again, bf16 = (_weights(tmp_path / name / "final") for name in ("fp32", "fp32b", "bf16"))
    assert _max_diff(fp32, again) == 0.0  # the comparison below is not run-to-run noise
    assert all(torch.isfinite(w).all() for w in bf16.values())
    assert _max_diff(fp32, bf16) > 1e-5


def test_explicit_bf16_flag_and_bad_mode(world, tmp_path):  # noqa: F811
    from convret.train.main import finalize_training_args

    m, d, l, t = _args(world, tmp_path / "x", "--bf16", "true", "--mixed_precision", "no")
    assert finalize_training_args(t, m).mixed_precision == "bf16"  # the Trainer's own flag wins
    m, d, l, t = _args(world, tmp_path / "x", "--mixed_precision", "bf17")
    with pytest.raises(ValueError, match="mixed_precision must be auto, bf16, fp16 or no"):
        finalize_training_args(t, m)


def test_auto_is_bf16_on_a_bf16_gpu_and_the_7b_configs_ask_for_auto(world, tmp_path, monkeypatch):  # noqa: F811
    """What auto resolves to where a CUDA GPU is (faked: there is none here), and the bundled 7B configs."""
    from convret.train.arguments import CONFIG_DIR, parse_arguments
    from convret.train.main import resolve_mixed_precision

    for name in ("chatretriever-qwen-7b.yaml", "uniconv-mistral-7b.yaml"):
        assert parse_arguments([], CONFIG_DIR / name)[0].mixed_precision == "auto"
    m, d, l, t = _args(world, tmp_path / "x", "--use_cpu", "false")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", t) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", t) == "no"
    assert resolve_mixed_precision("fp16", t) == "fp16"


# ---------------------------------------------------------------------------------------------- GradCache
class _FirstStepGradients(TrainerCallback):
    """The gradients of every trainable parameter and of the learnable temperature just before the first
    optimizer step (after all micro-batches of the accumulation)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.grads: dict[str, torch.Tensor] = {}
        _FirstStepGradients.last = self

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step != 0:
            return
        for name, p in self.trainer.model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, f"{name}: no gradient"
                self.grads[name] = p.grad.detach().clone()
        self.grads["log_temperature"] = self.trainer.recipe.log_temperature.grad.detach().clone()


def _nonzero_lora_b(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B: the LoRA A matrices get gradients too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_gradcache_under_accumulation_equals_the_plain_step_through_the_trainer(world, tmp_path,  # noqa: F811
                                                                               accumulation):
    """One optimizer step of LoRA + summary rows + learnable temperature, gradient accumulation 1 / 2 / 4 (the
    Trainer's loop, accelerator.backward): GradCache in chunks of one row gives the unchunked step's gradients
    for every trainable parameter and the temperature (the contrastive part was 1/GA^2 before the fix)."""
    flags = ["--max_steps", "1", "--save_steps", "100", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", str(accumulation), "--max_grad_norm", "0",
             "--learnable_temperature", "true", "--lora", "true", "--lora_r", "4", "--lora_alpha", "8",
             "--lora_dropout", "0", "--lora_target_modules", "q_proj", "v_proj", "up_proj"]
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--gradcache_chunk_rows", "1"])):
        assert _train(world, tmp_path / name, *flags, *extra, setup=_nonzero_lora_b,
                      callback=_FirstStepGradients) == 0
        runs[name] = _FirstStepGradients.last.grads
    want, got = runs["plain"], runs["cached"]
    assert want.keys() == got.keys()
    assert any("lora_A" in n for n in want) and any("lora_B" in n for n in want)
    assert any("trainable_tokens" in n for n in want)
    for name in want:
        assert want[name].abs().max() > 0, f"{name}: zero gradient, the comparison cannot fail"
        err = float((got[name] - want[name]).norm() / want[name].norm())
        assert err < 1e-4, f"GA {accumulation}, {name}: relative error {err:.2e}"


def test_gradcache_scales_once_under_a_loss_scaler():
    """What the fp16 GradScaler does inside accelerator.backward (multiply what is back-propagated by S) applied
    to the GradCache step with loss_scale 1/2: the gradients are S/2 times the plain ones, not S^2/4 (the
    cached embedding gradients must not carry the scaling a second time)."""
    from test_train_gradcache import _batch, _grads, _model, _recipe

    from convret.train.gradcache import gradcache_step

    scaler = 1024.0
    batch = _batch()
    model, recipe = _model(0.0), _recipe()
    (recipe(model, batch).loss * 0.5 * scaler).backward()
    want = _grads(model, recipe)
    gradcache_step(model, recipe, batch, 2, backward=lambda t: (t * scaler).backward(), loss_scale=0.5)
    got = _grads(model, recipe)
    for name in want:
        assert want[name].abs().max() > 0, name
        err = float((got[name] - want[name]).norm() / want[name].norm())
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------- negatives
def _rich_example(index=0, negatives=10, positives=3):
    from convret.data.records import Passage, TrainingExample, Turn

    return TrainingExample(f"q{index}", [Turn("user", "w1")], "w2", Passage("pos0", "w3"),
                           [Passage(f"neg{j}", f"w{10 + j}") for j in range(negatives)], "w3",
                           positives=[Passage(f"pos{j}", f"w{3 + j}") for j in range(positives)])


def test_negatives_and_positives_are_drawn_per_epoch_from_seed_epoch_and_index():
    from convret.train.data import EpochShuffleSampler, TrainingDataset

    data = TrainingDataset([_rich_example(0), _rich_example(1)], num_negatives=3, seed=11)
    draws = [data[(epoch, 0)] for epoch in range(16)]
    sets = [tuple(n.id for n in ex.negatives) for ex in draws]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in sets)  # without replacement
    assert sets[0] != sets[1], "the negatives do not rotate across epochs"
    assert {n for s in sets for n in s} == {f"neg{j}" for j in range(10)}, "some negatives are never drawn"
    assert {ex.positive.id for ex in draws} == {"pos0", "pos1", "pos2"}, "one positive only"
    # a function of (seed, epoch, index) alone: another dataset object, another order of lookups
    again = TrainingDataset([_rich_example(0), _rich_example(1)], num_negatives=3, seed=11)
    assert [tuple(n.id for n in again[(e, 0)].negatives) for e in reversed(range(16))] == sets[::-1]
    assert data[0] == data[(0, 0)]
    other_index = [tuple(n.id for n in data[(e, 1)].negatives) for e in range(16)]
    other_seed = TrainingDataset([_rich_example(0)], num_negatives=3, seed=12)
    assert other_index != sets and [tuple(n.id for n in other_seed[(e, 0)].negatives) for e in range(16)] != sets
    # sampling off: the first ones, every epoch
    fixed = TrainingDataset([_rich_example(0)], num_negatives=3, seed=11, sample=False)
    assert {tuple(n.id for n in fixed[(e, 0)].negatives) for e in range(4)} == {("neg0", "neg1", "neg2")}
    assert {fixed[(e, 0)].positive.id for e in range(4)} == {"pos0"}
    # the sampler hands the epoch to the dataset
    sampler = EpochShuffleSampler(2, seed=3)
    sampler.set_epoch(5)
    assert sorted(sampler) == [(5, 0), (5, 1)]


class _SeenNegatives(TrainerCallback):
    """Wraps the Trainer's collator: the negatives' ids each example was trained with, per step."""

    def __init__(self, trainer):
        self.seen: dict[str, list[tuple[str, ...]]] = {}
        collate = trainer.data_collator

        def recording(examples):
            for ex in examples:
                self.seen.setdefault(ex.id, []).append(tuple(n.id for n in ex.negatives))
            return collate(examples)

        trainer.data_collator = recording
        _SeenNegatives.last = self


def test_trainer_rotates_the_negatives_across_epochs(world, tmp_path):  # noqa: F811
    examples = make_examples(8, negatives=6)
    flags = ["--max_steps", "6", "--save_steps", "100", "--num_negatives", "2"]  # 3 epochs of 2 batches
    assert _train(world, tmp_path / "run", *flags, examples=examples, callback=_SeenNegatives) == 0
    seen = _SeenNegatives.last.seen
    assert sorted(seen) == sorted(ex.id for ex in examples) and all(len(v) == 3 for v in seen.values())
    for ex in examples:
        draws = seen[ex.id]
        assert all(len(d) == 2 and set(d) <= {n.id for n in ex.negatives} for d in draws)
        assert len({n for d in draws for n in d}) > 2, f"{ex.id}: the same negatives every epoch"


def test_tevatron_reader_keeps_every_positive(tmp_path):
    from convret.data import read_training

    path = tmp_path / "train.jsonl"
    record = {"query_id": "q1", "query": "what is w1",
              "positive_passages": [{"docid": "d1", "text": "w1 is"}, {"docid": "d2", "text": "w1 was"}],
              "negative_passages": [{"docid": "d3", "text": "w2"}]}
    single = {**record, "query_id": "q2", "positive_passages": record["positive_passages"][:1]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(single) + "\n")
    first, second = list(read_training(path, format="tevatron"))
    assert first.positive.id == "d1" and [p.id for p in first.positives] == ["d1", "d2"]
    assert second.positive.id == "d1" and second.positives == []


# ---------------------------------------------------------------------------------------------- compat flags
class _Batches(TrainerCallback):
    def __init__(self, trainer):
        self.batches = []
        collate = trainer.data_collator

        def recording(examples):
            out = collate(examples)
            self.batches.append(out["batch"])
            return out

        trainer.data_collator = recording
        _Batches.last = self


def test_chatretriever_compat_from_convret_train_to_the_batch_and_encode(world, tmp_path):  # noqa: F811
    """--chatretriever_compat / --separator_token reach the training batch ([SEP, EMB_1..EMB_t] before every
    pooled position) and the checkpoint, whose encoder embeds sessions and passages with the same block."""
    from convret.retrieval.encoder import Encoder
    from convret.train.checkpoint import RetrieverConfig

    out = tmp_path / "compat"
    flags = ["--max_steps", "1", "--save_steps", "100", "--chatretriever_compat", "true",
             "--separator_token", "<|im_start|>"]
    assert _train(world, out, *flags, callback=_Batches) == 0
    config = RetrieverConfig.from_file(out / "final" / "convret_config.json")
    encoder = Encoder.from_checkpoint(out / "final")
    sep = encoder.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (config.chatretriever_compat, config.separator_token, config.separator_token_id) == \
        (True, "<|im_start|>", sep)
    block = [sep, *config.summary_token_ids]
    batch = _Batches.last.batches[0]
    positions = torch.cat([batch.query_positions, batch.passage_positions])
    assert positions.shape[0] > 0
    for row, pos in positions.tolist():
        assert batch.input_ids[row, pos - len(block) + 1: pos + 1].tolist() == block
    from convret.data.records import Turn

    session = encoder.session_tokens([Turn("user", "w1"), Turn("assistant", "w2")], "w3")
    passage = encoder.passage_tokens("w4 w5")
    assert session[-len(block):] == block and passage[-len(block):] == block
    # without compat: no separator, and a separator_token alone is an error
    assert RetrieverConfig.from_file(out / "init" / "convret_config.json").summary_block() == block
    m, d, l, t = _args(world, tmp_path / "x", "--separator_token", "<|im_start|>")
    from convret.train.model import build_model

    with pytest.raises(ValueError, match="only used with chatretriever_compat"):
        build_model(m, d, l)
    m, d, l, t = _args(world, tmp_path / "x", "--chatretriever_compat", "true", "--separator_token", "nope")
    with pytest.raises(ValueError, match="'nope' is not a token"):
        build_model(m, d, l)
    m, d, l, t = _args(world, tmp_path / "x", "--chatretriever_compat", "true")
    assert build_model(m, d, l).config.separator_token == "<|im_end|>"  # the tokenizer's EOS by default
