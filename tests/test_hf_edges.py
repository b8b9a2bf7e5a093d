"""attn_implementation="convret" at the edges transformers' own model tests reach, on the model matrix's families
(tests/_model_matrix.py: tiny Qwen2.5, Qwen3, Llama-3 and Mistral models with their real tokenizers' BOS / EOS):

- a one-token forward without a cache, ``generate()`` from a one-token or BOS-only prompt and without input_ids;
- the loss's keywords (``shift_labels``, ``ignore_index``, ``num_items_in_batch``) that transformers hands down to
  every attention call; the explicit keyword tables;
- ``output_attentions=True``: the weights of eager attention;
- sliding windows (Mistral's ``sliding_window``, Qwen2 / Qwen3 sliding layers) on every path: plain, left padding,
  packed position ids, a session layout, training gradients, generation with a dynamic and a static cache;
- static caches, whose keys do not end at the queries before they fill.

Oracles: transformers' eager attention with the mask transformers builds itself (its own sliding-window mask
included), or with the explicit 4-D mask of the layout (``layout.dense_mask(window)``); SDPA for generation.
fp32, norm-wise relative error below 1e-5 on the positions that are not padding; generated tokens equal.
Runs on transformers 5.25 and 4.57.6.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import convret.hf  # noqa: F401  (registers "convret")
from convret import SessionLayout
from convret.baselines import additive_mask
from convret.ops.session_attention import reference_attention

TOL = 1e-5
FAMILIES = ("qwen2.5", "qwen3", "llama3", "mistral")  # llama3-tied is llama3's architecture
SLIDING = ("qwen2.5", "qwen3", "mistral")  # the families whose architecture has sliding-window layers
WINDOW = 5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def load(model_family, family: str, impl: str = "convret", window: int | None = None):
    """The family's tiny model; with ``window``, every layer of Mistral and the second layer of Qwen2 / Qwen3
    (``max_window_layers=1``) use a sliding window of that many keys."""
    path = model_family(family)
    config = AutoConfig.from_pretrained(path)
    if window is not None:
        config.sliding_window = window
        if family != "mistral":
            config.use_sliding_window, config.max_window_layers = True, 1
            config.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=impl).eval()


def token_ids(model, shape, seed):
    low = 3 if model.config.vocab_size > 3 else 0
    return torch.randint(low, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def with_impl(model, impl, fn):
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.set_attn_implementation("convret")


def greedy(model, *args, **kwargs):
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    return model.generate(*args, do_sample=False, pad_token_id=pad, **kwargs)


# ------------------------------------------------------------------------------------------- one token
@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_forward_and_generation_from_one_token(model_family, family):
    """``model(ids[:, :1])`` without a cache, ``generate()`` from a one-token prompt, from the family's BOS alone
    and without input_ids (where the family has a BOS): the same as SDPA (these once raised IndexError)."""
    model = load(model_family, family)
    one = token_ids(model, (2, 1), seed=1)
    bos = model.config.bos_token_id
    runs = {
        "forward": lambda: model(one, use_cache=False).logits,
        "generate": lambda: greedy(model, one, attention_mask=torch.ones_like(one), max_new_tokens=4),
    }
    if bos is not None:
        runs["bos"] = lambda: greedy(model, torch.tensor([[bos]]), max_new_tokens=4)
        runs["no input_ids"] = lambda: greedy(model, max_new_tokens=4)
    for name, run in runs.items():
        with torch.no_grad():
            got = run()
        want = with_impl(model, "sdpa", run)
        if name == "forward":
            assert rel_err(got, want) < TOL, name
        else:
            assert torch.equal(got, want), name


# ---------------------------------------------------------------------------------------------- keywords
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_keywords_reach_attention_and_change_nothing(model_family, family):
    """``shift_labels``, ``ignore_index`` and ``num_items_in_batch`` reach every attention call as keywords;
    the loss and logits are SDPA's."""
    model = load(model_family, family)
    ids = token_ids(model, (2, 9), seed=2)
    labels = ids.clone()
    labels[0, :3] = -100
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)

    def run():
        return model(ids, labels=labels, shift_labels=shift_labels, ignore_index=-100,
                     num_items_in_batch=torch.tensor(12), use_cache=False)

    with torch.no_grad():
        got = run()
    want = with_impl(model, "sdpa", run)
    assert rel_err(got.logits, want.logits) < TOL
    assert rel_err(got.loss, want.loss) < TOL


class _Attention(torch.nn.Module):
    num_key_value_groups = 2


def _qkv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 4, 32, generator=g), torch.randn(1, 1, 4, 32, generator=g)


@pytest.mark.parametrize("keyword", sorted(convret.hf.IGNORED_KEYWORDS))
def test_every_ignored_keyword_changes_nothing(keyword):
    q, k = _qkv()
    plain, _ = convret.hf.convret_attention_forward(_Attention(), q, k, k, None)
    value = {"use_cache": True, "return_dict": True, "output_hidden_states": True, "output_router_logits": True,
             "deterministic": True, "layer_idx": 0, "ignore_index": -100, "max_length_q": 4,
             "max_length_k": 4}.get(keyword, torch.arange(4)[None])
    out, _ = convret.hf.convret_attention_forward(_Attention(), q, k, k, None, **{keyword: value})
    assert torch.equal(out, plain)


@pytest.mark.parametrize("keyword", sorted(convret.hf.REFUSED_KEYWORDS) + ["indices", "some_future_option"])
def test_every_refused_keyword_raises_with_its_advice(keyword):
    q, k = _qkv()
    with pytest.raises(NotImplementedError, match=keyword) as error:
        convret.hf.convret_attention_forward(_Attention(), q, k, k, None, **{keyword: torch.zeros(2)})
    advice = convret.hf.REFUSED_KEYWORDS.get(keyword, "does not know")
    assert advice in str(error.value)
    assert "attn_implementation=" in str(error.value)
    # None is what transformers passes when the feature is off: accepted
    convret.hf.convret_attention_forward(_Attention(), q, k, k, None, **{keyword: None})


def test_varlen_offsets_name_the_collator_switch():
    q, k = _qkv()
    with pytest.raises(NotImplementedError, match="return_flash_attn_kwargs=False"):
        convret.hf.convret_attention_forward(_Attention(), q, k, k, None, cu_seq_lens_q=torch.tensor([0, 4]))


# ------------------------------------------------------------------------------------- output_attentions
def left_padded(model, seed):
    ids = token_ids(model, (2, 11), seed)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    return ids, attention_mask


def assert_weights_match(got, want, real):
    """Per layer ``[B, H, Lq, Lk]`` weights equal on the rows of real query tokens."""
    assert len(got) == len(want) > 0
    for layer, (g, w) in enumerate(zip(got, want)):
        assert g is not None and g.shape == w.shape, layer
        rows = real[:, None, :, None].expand_as(g)
        assert rel_err(g[rows], w[rows]) < TOL, layer


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_are_eager_weights(model_family, family):
    """``output_attentions=True`` (keyword or config): the weights and logits of eager attention on the rows of
    real tokens, left padding included; with a sliding window (where the family has one) too; the logits are the
    same as without the flag."""
    windows = [None, WINDOW] if family in SLIDING else [None]
    for window in windows:
        model = load(model_family, family, window=window)
        ids, attention_mask = left_padded(model, seed=3)
        real = attention_mask.bool()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers 4.57 warns for every implementation but eager
            with torch.no_grad():
                got = model(ids, attention_mask=attention_mask, output_attentions=True)
                fast = model(ids, attention_mask=attention_mask).logits
                # transformers refuses config.output_attentions for any implementation but eager: set it there
                model.set_attn_implementation("eager")
                model.config.output_attentions = True
                model.set_attn_implementation("convret")
                from_config = model(ids, attention_mask=attention_mask).attentions
                model.config.output_attentions = False
            want = with_impl(model, "eager", lambda: model(ids, attention_mask=attention_mask, output_attentions=True))
        assert_weights_match(got.attentions, want.attentions, real)
        assert_weights_match(from_config, want.attentions, real)
        assert rel_err(got.logits[real], want.logits[real]) < TOL
        assert rel_err(got.logits[real], fast[real]) < TOL


def test_output_attentions_with_a_session_layout():
    """With a session layout the weights are eager's under the layout's 4-D mask (rows of padding: zeros)."""
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(5)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret").eval()
    layout = SessionLayout.from_segments([[(6, 2, 4), (5, 0, 0)], [(9, 1, 3)]], 19)
    ids = torch.randint(0, 128, (2, 19))
    real = layout.dense_mask().any(-1)
    with torch.no_grad():
        got = model(ids, session_layout=layout, position_ids=layout.position_ids(), use_cache=False,
                    output_attentions=True)
    want = with_impl(model, "eager", lambda: model(ids, attention_mask=additive_mask(layout, torch.float32),
                                                   position_ids=layout.position_ids(), output_attentions=True))
    assert_weights_match(got.attentions, want.attentions, real)
    for weights in got.attentions:
        assert bool((weights.permute(0, 2, 1, 3)[~real] == 0).all())


# ---------------------------------------------------------------------------------------- sliding windows
def eager_layout_mask(layout: SessionLayout, window: int | None) -> torch.Tensor:
    """The additive ``[B, 1, L, L]`` mask of a layout under a window: what eager is given as the oracle."""
    allowed = layout.dense_mask(window).unsqueeze(1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_step(model, impl, **inputs):
    model.set_attn_implementation(impl)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    model.set_attn_implementation("convret")
    model.eval()
    return out.logits.detach(), grads_of(model)


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_training_matches_eager(model_family, family):
    """Sequences longer than the window: logits and every gradient equal eager's with the sliding-window mask
    transformers builds itself (no padding: the session kernels run with the window), and with the layout's
    4-D mask under the window (a CSIT row whose samples are longer than the window)."""
    model = load(model_family, family, window=WINDOW)
    ids = token_ids(model, (2, 23), seed=4)
    got_logits, got_grads = train_step(model, "convret", input_ids=ids, labels=ids)
    want_logits, want_grads = train_step(model, "eager", input_ids=ids, labels=ids)
    assert rel_err(got_logits, want_logits) < TOL
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in got_grads:
        assert rel_err(got_grads[name], want_grads[name]) < TOL, name

    layout = SessionLayout.from_segments([[(9, 2, 6), (4, 0, 0)], [(12, 1, 0), (7, 2, 1)]], 23)
    real = layout.dense_mask().any(-1)
    labels = ids.masked_fill(~real, -100)
    # eager gets one 4-D mask for every layer: make every layer a sliding one (Qwen's first is a full layer)
    for layer in model.model.layers:
        layer.self_attn.sliding_window = WINDOW
    got_logits, got_grads = train_step(model, "convret", input_ids=ids, labels=labels, session_layout=layout,
                                       position_ids=layout.position_ids())
    want_logits, want_grads = train_step(model, "eager", input_ids=ids, labels=labels,
                                         attention_mask=eager_layout_mask(layout, WINDOW),
                                         position_ids=layout.position_ids())
    assert rel_err(got_logits[real], want_logits[real]) < TOL
    for name in got_grads:
        assert rel_err(got_grads[name], want_grads[name]) < TOL, name


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_padding_packing_and_generation(model_family, family):
    """Left padding, packed position ids without a layout, greedy generation past the window with the dynamic
    (sliding) cache and with a static cache: eager's logits, SDPA's tokens."""
    model = load(model_family, family, window=WINDOW)
    ids, attention_mask = left_padded(model, seed=6)
    real = attention_mask.bool()
    run = lambda: model(ids, attention_mask=attention_mask).logits  # noqa: E731
    with torch.no_grad():
        got = run()
    assert rel_err(got[real], with_impl(model, "eager", run)[real]) < TOL

    packed = SessionLayout.from_segments([[(7, 0, 0), (4, 0, 0)], [(11, 0, 0)]], 11)
    run = lambda: model(ids, position_ids=packed.position_ids(), use_cache=False).logits  # noqa: E731
    with torch.no_grad():
        got = run()
    assert rel_err(got, with_impl(model, "eager", run)) < TOL

    for cache in ({}, {"cache_implementation": "static"}):
        run = lambda: greedy(model, ids, attention_mask=attention_mask, max_new_tokens=8, **cache)  # noqa: E731
        with torch.no_grad():
            got = run()
        assert torch.equal(got, with_impl(model, "sdpa", run)), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_prefill_and_generation(model_family, family):
    """A static cache is longer than the keys written so far, and its keys do not end at the queries: the
    prefill's logits equal those without a cache, and greedy generation equals SDPA's (convret once attended
    bottom-right over the whole buffer here)."""
    model = load(model_family, family)
    ids, attention_mask = left_padded(model, seed=7)
    real = attention_mask.bool()
    with torch.no_grad():
        plain = model(ids, attention_mask=attention_mask).logits
        prefill = model(ids, attention_mask=attention_mask, use_cache=True,
                        past_key_values=transformers.StaticCache(config=model.config, max_cache_len=32)).logits
    assert rel_err(prefill[real], plain[real]) < TOL
    run = lambda: greedy(model, ids, attention_mask=attention_mask, max_new_tokens=6,  # noqa: E731
                         cache_implementation="static")
    with torch.no_grad():
        got = run()
    assert torch.equal(got, with_impl(model, "sdpa", run))


def test_sliding_window_under_torch_compile():
    """The attention function with a window under torch.compile (aot_eager), where no host sync may happen: plain
    rows and packed position ids (the dense band with the samples' blocks), a layout (the session kernels with the
    window) give the eager-mode outputs, which are the float64 oracle's."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, h, 17, 32, generator=g) for h in (4, 2, 2))
    layout = SessionLayout.from_segments([[(9, 2, 4)], [(6, 0, 0), (10, 0, 0)]], 17)
    packed = SessionLayout.from_segments([[(8, 0, 0), (9, 0, 0)], [(17, 0, 0)]], 17)
    cases = {"plain": ({"position_ids": torch.arange(17)[None]}, SessionLayout.from_segments([[(17, 0, 0)]] * 2, 17)),
             "packed": ({"position_ids": packed.position_ids()}, packed),
             "layout": ({"session_layout": layout, "position_ids": layout.position_ids()}, layout)}

    def attend(q, k, v, **kwargs):
        return convret.hf.convret_attention_forward(_Attention(), q, k, v, None, sliding_window=WINDOW, **kwargs)[0]

    compiled = torch.compile(attend, backend="aot_eager", dynamic=False)
    for name, (kwargs, oracle_layout) in cases.items():
        want = reference_attention(q.double(), k.double(), v.double(), oracle_layout, 32**-0.5, WINDOW)
        real = oracle_layout.dense_mask().any(-1)
        for got in (attend(q, k, v, **kwargs), compiled(q, k, v, **kwargs)):
            assert rel_err(got[real], want.transpose(1, 2)[real]) < TOL, name


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])
def test_packed_rows_train_with_attention_dropout(model_family, family):
    """Packed rows found from position ids, in training with attention dropout (once refused as if a layout had
    been given): SDPA with the block-diagonal mask, the same numbers as transformers' SDPA path under the same
    random state; plain rows keep SDPA's causal fast path."""
    model = load(model_family, family)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids = token_ids(model, (2, 13), seed=9)
    packed = SessionLayout.from_segments([[(6, 0, 0), (7, 0, 0)], [(4, 0, 0), (5, 0, 0), (4, 0, 0)]], 13)
    for position_ids in (packed.position_ids(), None):
        outputs = []
        for impl in ("convret", "sdpa"):
            model.set_attn_implementation(impl)
            model.train()
            torch.manual_seed(10)
            outputs.append(model(ids, labels=ids, position_ids=position_ids, use_cache=False).loss)
            outputs[-1].backward()
        model.set_attn_implementation("convret")
        assert rel_err(outputs[0].detach(), outputs[1].detach()) < TOL
        torch.manual_seed(11)  # another random state, another dropout mask: the case can fail
        other = model(ids, labels=ids, position_ids=position_ids, use_cache=False).loss.detach()
        assert rel_err(other, outputs[0].detach()) > 1e-4


def test_head_dims_the_kernels_do_not_take_stay_on_sdpa():
    """Head dim 12 (not a multiple of 8): packed rows and sliding windows without a layout run through SDPA's
    dense masks instead of refusing, and match eager."""
    config = transformers.MistralConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        sliding_window=4, tie_word_embeddings=False)
    torch.manual_seed(12)
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation="convret").eval()
    assert model.model.layers[0].self_attn.head_dim == 12
    ids = torch.randint(0, 64, (2, 11))
    packed = SessionLayout.from_segments([[(5, 0, 0), (6, 0, 0)], [(11, 0, 0)]], 11)
    for kwargs in ({}, {"position_ids": packed.position_ids()}):
        run = lambda: model(ids, use_cache=False, **kwargs).logits  # noqa: E731
        with torch.no_grad():
            got = run()
        assert rel_err(got, with_impl(model, "eager", run)) < TOL, sorted(kwargs)
