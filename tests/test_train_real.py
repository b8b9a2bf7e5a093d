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
def test_gradcache_under_accumulation_equals_the_plain_step_through_the_trainer(world, tmp_path, accumulation):  # noqa: F811
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
