"""GradCache: chunked embedding + cached gradients give the unchunked step's parameter gradients (fp32), the
learnable temperature's included; with LoRA dropout on, the re-run chunks replay the dropout masks."""
from __future__ import annotations

import random

import pytest
import torch

from _tiny import tiny_qwen2

SUMMARY = [77, 78, 79]


def _batch(seed=0, examples=6, max_len=64):
    from convret.collate import CSITCollator, CSITExample

    rng = random.Random(seed)
    toks = lambda n: [rng.randrange(3, 70) for _ in range(n)]  # noqa: E731
    items = [CSITExample(session=toks(rng.randrange(5, 20)), positive=toks(rng.randrange(4, 10)),
                         negatives=[toks(rng.randrange(4, 10)) for _ in range(2)],
                         response=toks(rng.randrange(3, 8))) for _ in range(examples)]
    return CSITCollator(SUMMARY, 0, max_len=max_len, pad_to_multiple_of=8)(items)


def _model(dropout):
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen2(80, seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=["q_proj", "v_proj", "up_proj"],
                                             trainable_token_indices={"embed_tokens": SUMMARY}))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so both LoRA factors get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def _recipe():
    from convret.train.recipes import CSITRecipe

    return CSITRecipe(alpha=0.2, temperature=0.05, learnable_temperature=True, label_smoothing=0.1, gather=False)


def _grads(model, recipe):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["log_temperature"] = recipe.log_temperature.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    recipe.log_temperature.grad = None
    return grads


def _assert_close(got, want, tol):
    for name in want:
        assert want[name].abs().max() > 0, f"{name}: zero gradient, the test cannot fail"
        err = float((got[name] - want[name]).norm() / want[name].norm())
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("chunk_rows", [1, 2])
def test_gradcache_equals_unchunked_step_without_dropout(chunk_rows):
    from convret.train.gradcache import gradcache_step

    batch = _batch()
    assert batch.input_ids.shape[0] >= 3, "the batch must span several row chunks"
    model, recipe = _model(0.0), _recipe()
    out = recipe(model, batch)
    out.loss.backward()
    want = _grads(model, recipe)
    cached = gradcache_step(model, recipe, batch, chunk_rows)
    got = _grads(model, recipe)
    torch.testing.assert_close(cached.loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for name in ("contrastive", "generation"):
        torch.testing.assert_close(cached.terms[name], out.terms[name].detach(), rtol=1e-5, atol=1e-6)
    _assert_close(got, want, 1e-4)


def test_gradcache_replays_dropout_masks():
    """With LoRA dropout 0.1: the reference embeds the same row chunks WITH gradient from the same RNG state
    and back-propagates the full-batch loss through one graph; GradCache must match it, which needs each
    chunk's dropout masks drawn again identically in the re-run."""
    from convret.csit import decoder_hidden
    from convret.train.gradcache import gradcache_step, row_chunk

    batch = _batch(seed=3)
    model, recipe = _model(0.1), _recipe()
    rows, chunk_rows = batch.input_ids.shape[0], 2
    positions = recipe.embedding_positions(batch)
    head = model.get_output_embeddings()
    count = recipe.global_label_tokens(batch.labels)

    torch.manual_seed(123)
    pooled = {name: [None] * pos.shape[0] for name, pos in positions.items()}
    generation = 0.0
    for a in range(0, rows, chunk_rows):
        b = min(a + chunk_rows, rows)
        hidden = decoder_hidden(model, row_chunk(batch, a, b))
        for name, pos in positions.items():
            for i, (r, p) in enumerate(pos.tolist()):
                if a <= r < b:
                    pooled[name][i] = hidden[r - a, p]
        generation = generation + recipe.generation(hidden, head, batch.labels[a:b], num_label_tokens=count)
    embeddings = {name: torch.stack(v) for name, v in pooled.items()}
    terms = recipe.contrastive_terms(embeddings, batch)
    terms["generation"] = generation
    recipe.combine(terms).backward()
    want = _grads(model, recipe)

    torch.manual_seed(123)
    gradcache_step(model, recipe, batch, chunk_rows)
    got = _grads(model, recipe)
    _assert_close(got, want, 1e-4)

    torch.manual_seed(124)  # other dropout masks: other gradients (so the comparison above can fail)
    gradcache_step(model, recipe, batch, chunk_rows)
    other = _grads(model, recipe)
    assert max(float((other[n] - want[n]).norm() / want[n].norm()) for n in want if "lora_A" in n) > 1e-3
