"""add_summary_tokens: new tokens (mean-initialised rows) and reused reserved tokens, through
save_pretrained / from_pretrained."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _tiny import tiny_qwen2, word_tokenizer
from convret.data import add_summary_tokens


def _pair(extra_tokens=()):
    tok = word_tokenizer()
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)}, replace_extra_special_tokens=False)
    return tiny_qwen2(vocab_size=len(tok), seed=1), tok


def test_new_tokens_round_trip(tmp_path):
    model, tok = _pair()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rows = old_in.shape[0]
    st = add_summary_tokens(model, tok, num_tokens=3)
    assert st.added and st.tokens == ["<|emb_0|>", "<|emb_1|>", "<|emb_2|>"]
    assert st.ids == list(range(rows, rows + 3))
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape[0] == rows + 3 and torch.equal(new_in[:rows], old_in)
    for weight, old in ((new_in, old_in), (new_out, old_out)):
        torch.testing.assert_close(weight[st.ids], old.mean(0).expand(3, -1), rtol=1e-6, atol=1e-7)
    # the im tokens the tokenizer already had as special tokens are kept
    assert "<|im_start|>" in tok.all_special_tokens and "<|emb_0|>" in tok.all_special_tokens
    assert tok("w1 <|emb_0|><|emb_1|>", add_special_tokens=False).input_ids[-2:] == st.ids[:2]

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert tok2("<|emb_2|>", add_special_tokens=False).input_ids == [st.ids[2]]
    assert "<|emb_1|>" in tok2.all_special_tokens and "<|im_end|>" in tok2.all_special_tokens
    again = add_summary_tokens(model2, tok2, num_tokens=3)
    assert again.ids == st.ids and not again.added and len(tok2) == len(tok)
    torch.testing.assert_close(model2.get_input_embeddings().weight, new_in)  # untouched by the second call
    torch.testing.assert_close(model2.get_output_embeddings().weight, new_out)
    with torch.no_grad():
        ids = torch.tensor([tok("w1 w2 <|emb_0|>", add_special_tokens=False).input_ids])
        torch.testing.assert_close(model2(ids).logits, model(ids).logits)


def test_reuse_reserved_tokens_by_name_round_trip(tmp_path):
    reserved = [f"<|extra_{i}|>" for i in range(4)]
    model, tok = _pair(reserved)
    before = model.get_input_embeddings().weight.detach().clone()
    st = add_summary_tokens(model, tok, num_tokens=3, reuse=reserved[:3])
    assert not st.added and st.ids == tok.convert_tokens_to_ids(reserved[:3])
    assert torch.equal(model.get_input_embeddings().weight, before) and len(tok) == before.shape[0]
    assert "<|emb_0|>" not in tok.get_vocab()

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    again = add_summary_tokens(model2, tok2, num_tokens=3, reuse=reserved[:3])
    assert again.ids == st.ids and tok2("<|extra_1|>", add_special_tokens=False).input_ids == [st.ids[1]]
    torch.testing.assert_close(model2.get_input_embeddings().weight, before)


def test_tokenizer_only_and_errors():
    tok = word_tokenizer()
    st = add_summary_tokens(None, tok, num_tokens=2)
    assert st.added and len(st.ids) == 2
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        add_summary_tokens(None, word_tokenizer(), num_tokens=1, reuse=["<|extra_9|>"])
    with pytest.raises(ValueError, match="num_tokens"):
        add_summary_tokens(None, tok, num_tokens=2, reuse=["w1"])
    with pytest.raises(ValueError, match=">= 1"):
        add_summary_tokens(None, tok, num_tokens=0)
    small = tiny_qwen2(vocab_size=10)
    with pytest.raises(ValueError, match="outside the model"):
        add_summary_tokens(small, word_tokenizer(), num_tokens=1, reuse=["w30"])
