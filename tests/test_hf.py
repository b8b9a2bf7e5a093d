"""Acceptance parity of attn_implementation="convret" against eager + dense additive mask, on tiny models.

Relative error is norm-wise, ``||a - b|| / ||b||``, over non-padding positions (eager gives finite garbage
on fully masked padding rows, convret gives zeros), fp32, below 1e-5.
"""
from __future__ import annotations

import random
import zlib

import peft
import pytest
import torch
import transformers

import convret.hf  # noqa: F401  (registers "convret")
from convret import SessionLayout
from convret.baselines import additive_mask

VOCAB = 128
TOL = 1e-5


def tiny_config(arch: str):
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, head_dim=32, tie_word_embeddings=False, attention_dropout=0.0,
    )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if arch == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
    raise ValueError(arch)


ARCHS = ["qwen2", "llama", "mistral"] + (["qwen3"] if hasattr(transformers, "Qwen3ForCausalLM") else [])


def random_layout(rng: random.Random, batch: int, seq_len: int) -> SessionLayout:
    """Rows of packed samples (LM samples with responses, plain causal samples), then random padding."""
    rows = []
    for _ in range(batch):
        row, used = [], 0
        budget = seq_len - rng.randint(0, seq_len // 4)
        while True:
            kind = rng.choice(["lm", "embed", "plain"])
            prefix, summary = rng.randint(1, 12), rng.randint(1, 3)
            response = rng.randint(1, 10) if kind == "lm" else 0
            if kind == "plain":
                summary = 0
            if used + prefix + summary + response > budget:
                break
            row.append((prefix, summary, response))
            used += prefix + summary + response
        if not row:
            row = [(budget, 0, 0)]
        rows.append(row)
    return SessionLayout.from_segments(rows, seq_len)


def real_positions(layout: SessionLayout) -> torch.Tensor:
    """bool [B, L]: True where a sample token sits (not padding)."""
    real = torch.zeros(layout.batch_size, layout.seq_len, dtype=torch.bool)
    for b, row in enumerate(layout.segments):
        real[b, : sum(sum(s) for s in row)] = True
    return real


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def build_model(arch: str, lora: bool, checkpointing: str | None, seed: int):
    config, cls = tiny_config(arch)
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="convret")
    if lora:
        lora_config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,  # non-zero B: both LoRA factors get gradients
        )
        model = peft.get_peft_model(model, lora_config)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        if checkpointing == "reentrant":
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.train()
    return model


def run_step(model, impl: str, input_ids, labels, layout):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    if impl == "convret":
        out = model(input_ids=input_ids, labels=labels, session_layout=layout, position_ids=layout.position_ids(),
                    use_cache=False)
    else:
        out = model(input_ids=input_ids, labels=labels, attention_mask=additive_mask(layout, torch.float32),
                    position_ids=layout.position_ids(), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


CASES = [(arch, lora, ckpt) for arch in ARCHS for lora in (False, True) for ckpt in (None, "reentrant", "non_reentrant")]


@pytest.mark.parametrize("arch,lora,checkpointing", CASES)
def test_parity_with_eager_dense_mask(arch, lora, checkpointing):
    seed = zlib.crc32(f"{arch}-{lora}-{checkpointing}".encode()) % 1000
    rng = random.Random(seed)
    model = build_model(arch, lora, checkpointing, seed)
    layout = random_layout(rng, batch=3, seq_len=rng.choice([24, 40, 64]))
    real = real_positions(layout)
    input_ids = torch.randint(0, VOCAB, (layout.batch_size, layout.seq_len))
    labels = input_ids.masked_fill(~real, -100)

    logits_c, loss_c, grads_c = run_step(model, "convret", input_ids, labels, layout)
    logits_e, loss_e, grads_e = run_step(model, "eager", input_ids, labels, layout)

    assert rel_err(logits_c[real], logits_e[real]) < TOL
    assert rel_err(loss_c, loss_e) < TOL
    if lora:
        assert any("lora_" in n for n in grads_c)
        assert all("lora_" in n for n in grads_c)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) > 0
    for name in grads_c:
        assert rel_err(grads_c[name], grads_e[name]) < TOL, name


@pytest.mark.parametrize("heads", [4, 8])
def test_parity_small_head_dims(heads):
    """The head dims of Hugging Face's own tiny test models: ``Qwen2Config(hidden_size=64,
    num_attention_heads=4)`` gives head dim 16 (8 heads: 8), which session_attention once refused."""
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    assert getattr(config, "head_dim", None) in (None, 64 // heads)
    torch.manual_seed(heads)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret")
    model.train()
    assert model.model.layers[0].self_attn.head_dim == 64 // heads
    rng = random.Random(heads)
    layout = random_layout(rng, batch=2, seq_len=40)
    real = real_positions(layout)
    input_ids = torch.randint(0, VOCAB, (layout.batch_size, layout.seq_len))
    labels = input_ids.masked_fill(~real, -100)
    logits_c, loss_c, grads_c = run_step(model, "convret", input_ids, labels, layout)
    logits_e, loss_e, grads_e = run_step(model, "eager", input_ids, labels, layout)
    assert rel_err(logits_c[real], logits_e[real]) < TOL
    assert rel_err(loss_c, loss_e) < TOL
    assert grads_c.keys() == grads_e.keys() and len(grads_c) > 0
    for name in grads_c:
        assert rel_err(grads_c[name], grads_e[name]) < TOL, name


def test_import_convret_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, convret; assert 'transformers' not in sys.modules, 'convret imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registration_is_idempotent_and_named_safely():
    import importlib

    from transformers import AttentionInterface

    name = convret.hf.ATTN_IMPLEMENTATION
    for forbidden in ("flash", "sdpa", "flex_attention", "/"):
        assert forbidden not in name
    fn = AttentionInterface._global_mapping[name]
    importlib.reload(convret.hf)
    convret.hf.register()
    assert AttentionInterface._global_mapping[name].__qualname__ == fn.__qualname__


def test_set_attn_implementation_through_peft_wrapper():
    config, cls = tiny_config("qwen2")
    model = peft.get_peft_model(cls._from_config(config), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.set_attn_implementation("convret")
    assert model.base_model.model.config._attn_implementation == "convret"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_without_layout_matches_sdpa_with_padding_and_generation(arch):
    """No session_layout: plain causal attention, 2-D padding mask honoured, generation with a KV cache."""
    config, cls = tiny_config(arch)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="convret").eval()
    input_ids = torch.randint(0, VOCAB, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding, as generate() expects
    with torch.no_grad():
        plain_c = model(input_ids).logits
        padded_c = model(input_ids, attention_mask=attention_mask).logits
        gen_c = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
        model.set_attn_implementation("sdpa")
        plain_s = model(input_ids).logits
        padded_s = model(input_ids, attention_mask=attention_mask).logits
        gen_s = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert rel_err(plain_c, plain_s) < TOL
    real = attention_mask.bool()
    assert rel_err(padded_c[real], padded_s[real]) < TOL
    assert torch.equal(gen_c, gen_s)


def test_kv_cache_chunked_prefill_is_bottom_right_causal():
    """Several new queries over a cache (Lq > 1, Lq < Lk) must attend causally, aligned at the end."""
    config, cls = tiny_config("llama")
    torch.manual_seed(1)
    model = cls._from_config(config, attn_implementation="convret").eval()
    input_ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        full = model(input_ids).logits
        first = model(input_ids[:, :10], use_cache=True)
        rest = model(input_ids[:, 10:], past_key_values=first.past_key_values, use_cache=True).logits
    assert rel_err(rest, full[:, 10:]) < TOL


def test_session_layout_rejects_a_cache_and_dropout():
    q = torch.randn(1, 2, 4, 32)
    k = torch.randn(1, 1, 6, 32)
    layout = SessionLayout.from_segments([[(4, 0, 0)]], 4)

    class Module(torch.nn.Module):
        num_key_value_groups = 2

    with pytest.raises(ValueError, match="same length"):
        convret.hf.convret_attention_forward(Module(), q, k, k, None, session_layout=layout)
    k = torch.randn(1, 1, 4, 32)
    with pytest.raises(NotImplementedError, match="dropout"):
        convret.hf.convret_attention_forward(Module(), q, k, k, None, dropout=0.1, session_layout=layout)
    with pytest.raises(ValueError, match="sliding_window=0"):
        convret.hf.convret_attention_forward(Module(), q, k, k, None, session_layout=layout, sliding_window=0)


def test_torch_compile_smoke():
    """The layout keyword survives torch.compile; compiled output equals eager-mode output."""
    config, cls = tiny_config("qwen2")
    config.num_hidden_layers = 1
    torch.manual_seed(2)
    model = cls._from_config(config, attn_implementation="convret").train()
    layout = SessionLayout.from_segments([[(6, 2, 5), (5, 0, 0)], [(9, 1, 0)]], 20)
    input_ids = torch.randint(0, VOCAB, (2, 20))
    kwargs = dict(session_layout=layout, position_ids=layout.position_ids(), use_cache=False)
    expected = model.model(input_ids, **kwargs).last_hidden_state
    compiled = torch.compile(model.model, backend="aot_eager", dynamic=False)
    got = compiled(input_ids, **kwargs).last_hidden_state
    got.sum().backward()
    real = real_positions(layout)
    assert rel_err(got[real], expected[real]) < TOL


# ------------------------------------------------------------------------------ packed rows without a layout
def packed_inputs(rows, seq_len, seed):
    """input_ids and restarting position_ids of rows of plain samples (lengths), right padding."""
    layout = SessionLayout.from_segments([[(n, 0, 0) for n in row] for row in rows], seq_len)
    input_ids = torch.randint(0, VOCAB, (len(rows), seq_len), generator=torch.Generator().manual_seed(seed))
    return layout, input_ids, layout.position_ids()


def eager_dense(model, input_ids, layout):
    model.set_attn_implementation("eager")
    try:
        return model(input_ids, attention_mask=additive_mask(layout, torch.float32),
                     position_ids=layout.position_ids(), use_cache=False).logits
    finally:
        model.set_attn_implementation("convret")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_position_ids_without_layout_stay_inside_their_samples(arch):
    """Position ids restarting inside a row: each sample attends to itself only (no silent cross-sample
    attention), as with an explicit layout and as eager with the dense block-diagonal mask."""
    config, cls = tiny_config(arch)
    torch.manual_seed(4)
    model = cls._from_config(config, attn_implementation="convret").eval()
    layout, input_ids, position_ids = packed_inputs([[7, 5, 9], [12, 9]], 21, seed=5)
    with torch.no_grad():
        got = model(input_ids, position_ids=position_ids, use_cache=False).logits
        with_layout = model(input_ids, session_layout=layout, position_ids=position_ids, use_cache=False).logits
        want = eager_dense(model, input_ids, layout)
        unpacked = model(input_ids, use_cache=False).logits  # what ignoring the restarts would give
    assert rel_err(got, want) < TOL
    assert torch.equal(got, with_layout)
    assert rel_err(unpacked, want) > 1e-2  # the case can fail


def test_packed_rows_with_right_padding_and_under_compile():
    config, cls = tiny_config("qwen2")
    config.num_hidden_layers = 1
    torch.manual_seed(6)
    model = cls._from_config(config, attn_implementation="convret").eval()
    layout, input_ids, position_ids = packed_inputs([[6, 8], [5, 4, 3]], 16, seed=7)
    attention_mask = real_positions(layout).long()
    real = attention_mask.bool()
    with torch.no_grad():
        want = eager_dense(model, input_ids, layout)
        got = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)
        got_compiled = compiled(input_ids, position_ids=position_ids, use_cache=False).logits
    assert rel_err(got[real], want[real]) < TOL
    assert rel_err(got_compiled[real], want[real]) < TOL  # the traced path: dense block-diagonal mask, no sync


def test_packed_row_with_left_padding_raises():
    config, cls = tiny_config("llama")
    model = cls._from_config(config, attn_implementation="convret").eval()
    input_ids = torch.randint(0, VOCAB, (1, 10))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    position_ids = torch.tensor([[1, 1, 0, 1, 2, 0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="padding that is not at its end"):
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


# ------------------------------------------------------------------------------ keywords and sliding window
class _Attention(torch.nn.Module):
    num_key_value_groups = 2


@pytest.mark.parametrize("keyword,value", [
    ("softcap", 50.0), ("s_aux", torch.zeros(2)), ("sinks", torch.zeros(2)), ("is_causal", False),
    ("cu_seq_lens_q", torch.tensor([0, 4])), ("head_mask", torch.ones(2)), ("some_future_option", 1),
])
def test_keywords_that_change_the_result_raise(keyword, value):
    q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 1, 4, 32)
    with pytest.raises(NotImplementedError, match=keyword):
        convret.hf.convret_attention_forward(_Attention(), q, k, k, None, **{keyword: value})


def test_harmless_keywords_are_accepted():
    q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 1, 4, 32)
    plain, _ = convret.hf.convret_attention_forward(_Attention(), q, k, k, None)
    out, _ = convret.hf.convret_attention_forward(
        _Attention(), q, k, k, None, is_causal=True, softcap=None, s_aux=None, use_cache=False,
        position_ids=torch.arange(4)[None], output_attentions=False, num_items_in_batch=torch.tensor(3))
    assert torch.equal(out, plain)


def test_sliding_window_applies_to_samples_not_rows():
    """Mistral with sliding_window=12: a packed row of 30 tokens whose samples are at most 12 long runs as
    without a window (and matches eager); a sample whose queries reach further back than the window sees only
    the window (eager under the layout's mask banded by the window)."""
    config, cls = tiny_config("mistral")
    config.sliding_window = 12
    torch.manual_seed(8)
    model = cls._from_config(config, attn_implementation="convret").eval()
    layout = SessionLayout.from_segments([[(6, 2, 4), (9, 3, 0), (6, 0, 0)], [(12, 0, 0)]], 30)
    input_ids = torch.randint(0, VOCAB, (2, 30))
    real = real_positions(layout)
    with torch.no_grad():
        got = model(input_ids, session_layout=layout, position_ids=layout.position_ids(), use_cache=False).logits
        want = eager_dense(model, input_ids, layout)
        packed = model(input_ids, position_ids=layout.position_ids(), attention_mask=real.long(),
                       use_cache=False).logits  # found from the position ids: plain causal samples
        plain = SessionLayout.from_segments([[(12, 0, 0), (12, 0, 0), (6, 0, 0)], [(12, 0, 0)]], 30)
        want_packed = eager_dense(model, input_ids, plain)
    assert rel_err(got[real], want[real]) < TOL
    assert rel_err(packed[real], want_packed[real]) < TOL
    too_long = SessionLayout.from_segments([[(25, 0, 0)]], 30)
    real = real_positions(too_long)
    with torch.no_grad():
        got = model(input_ids[:1], session_layout=too_long, position_ids=too_long.position_ids(),
                    use_cache=False).logits
        banded = too_long.dense_mask(12).unsqueeze(1)
        model.set_attn_implementation("eager")
        want = model(input_ids[:1], attention_mask=torch.zeros(banded.shape).masked_fill(~banded, torch.finfo(torch.float32).min),
                     position_ids=too_long.position_ids(), use_cache=False).logits
        model.set_attn_implementation("convret")
        unbanded = eager_dense(model, input_ids[:1], too_long)
    assert rel_err(got[real], want[real]) < TOL
    assert rel_err(unbanded[real], want[real]) > 1e-3  # the window changes the result: the case can fail


def test_max_attention_span():
    assert SessionLayout.from_segments([[(6, 2, 4), (9, 3, 0)]], 30).max_attention_span() == 11
    assert SessionLayout.from_segments([[(20, 2, 4)]], 30).max_attention_span() == 21  # prefix + summary - 1
    assert SessionLayout.from_segments([[(2, 3, 9)]], 14).max_attention_span() == 11  # summary + response - 1
