"""The model matrix's fixtures behave like the real families (what the pipeline tests rely on)."""
import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from _model_matrix import FAMILIES

USER = {"role": "user", "content": "tell me about the red lamp"}
ASSISTANT = {"role": "assistant", "content": "It is red."}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_like_a_downloaded_model(model_family, family):
    path = model_family(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rows = model.get_input_embeddings().weight.shape[0]
    if family == "qwen2.5":
        assert rows > len(tokenizer)  # Qwen pads its vocabulary: spare rows
    else:
        assert rows == len(tokenizer)  # new summary tokens force a resize
    assert model.config.tie_word_embeddings == (family in ("qwen3", "llama3-tied"))
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def test_family_template_behaviour(model_family):
    qwen = AutoTokenizer.from_pretrained(model_family("qwen2.5"))
    assert "You are a helpful assistant" in qwen.apply_chat_template([ASSISTANT], tokenize=False)
    llama = AutoTokenizer.from_pretrained(model_family("llama3"))
    text = llama.apply_chat_template([USER], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and text.endswith("<|eot_id|>")
    assert llama("a").input_ids[0] == llama.bos_token_id and llama.pad_token is None
    mistral = AutoTokenizer.from_pretrained(model_family("mistral"))
    assert mistral.apply_chat_template([USER, ASSISTANT], tokenize=False) == \
        "<s>[INST] tell me about the red lamp[/INST] It is red.</s>"
    for messages in ([ASSISTANT], [ASSISTANT, USER], [USER, USER]):
        with pytest.raises(TemplateError):
            mistral.apply_chat_template(messages, tokenize=False)
    v01 = AutoTokenizer.from_pretrained(model_family("mistral-v0.1"))
    text = v01.apply_chat_template([USER, ASSISTANT, USER], tokenize=False)
    assert text == "<s>[INST] tell me about the red lamp [/INST]It is red.</s> [INST] tell me about the red lamp [/INST]"
    assert not {"[INST]", "[/INST]"} & set(v01.get_vocab())  # the markers are text, not tokens
    assert v01("a").input_ids[0] == v01.bos_token_id and v01.pad_token is None
    for messages in ([ASSISTANT], [USER, USER], [{"role": "system", "content": "x"}, USER]):
        with pytest.raises(TemplateError):
            v01.apply_chat_template(messages, tokenize=False)
    qwen3 = AutoTokenizer.from_pretrained(model_family("qwen3"))
    assert "<think>" in qwen3.apply_chat_template([USER, ASSISTANT], tokenize=False)
    assert "system" not in qwen3.apply_chat_template([USER], tokenize=False)
