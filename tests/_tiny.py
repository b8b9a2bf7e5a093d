"""Tiny models and tokenizers for tests: built in-process, nothing downloaded."""
from __future__ import annotations

import torch


def word_tokenizer(words: list[str] | None = None):
    """A Hugging Face fast tokenizer over a small word-level vocabulary, with ChatML special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or [f"w{i}" for i in range(60)] + ["user", "assistant", "system", "tell", "me", "about", "the"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen2(vocab_size: int, seed: int = 0, head_dim: int = 32, **overrides):
    from transformers import AutoModelForCausalLM, Qwen2Config

    import convret.hf  # noqa: F401

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=2 * head_dim * 2, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, **overrides)
    config.head_dim = config.hidden_size // config.num_attention_heads
    return AutoModelForCausalLM.from_config(config, attn_implementation="convret")
