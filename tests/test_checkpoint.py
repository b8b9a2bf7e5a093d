"""Self-describing checkpoints: full and LoRA models round-trip through save_retriever / load_retriever."""
import json

import numpy as np
import pytest
import torch

from convret import SessionLayout
from convret.data.records import Turn
from convret.data.summary_tokens import add_summary_tokens
from convret.train.checkpoint import RetrieverConfig, is_checkpoint, load_retriever, save_retriever

from _tiny import tiny_qwen2, word_tokenizer


def _hidden(model, ids):
    layout = SessionLayout.from_segments([[(ids.shape[1], 0, 0)]], ids.shape[1])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        return base.model(input_ids=ids, session_layout=layout, position_ids=layout.position_ids(),
                          use_cache=False).last_hidden_state


def _model_and_tokenizer():
    tokenizer = word_tokenizer()
    model = tiny_qwen2(len(tokenizer))
    summary = add_summary_tokens(model, tokenizer, 3)
    return model, tokenizer, summary


def test_full_model_round_trip(tmp_path):
    model, tokenizer, summary = _model_and_tokenizer()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    config = RetrieverConfig(summary.tokens, summary.ids, normalize=True, max_session_len=77)
    save_retriever(tmp_path / "ckpt", model, tokenizer, config)
    assert is_checkpoint(tmp_path / "ckpt") and not list(tmp_path.glob(".ckpt.tmp-*"))
    loaded = load_retriever(tmp_path / "ckpt")
    assert loaded.config.summary_token_ids == summary.ids and loaded.config.max_session_len == 77
    assert not loaded.config.adapter
    ids = torch.randint(0, len(tokenizer), (1, 20))
    ids[0, -3:] = torch.tensor(summary.ids)
    torch.testing.assert_close(_hidden(loaded.model, ids), _hidden(model.eval(), ids), rtol=0, atol=0)


def test_lora_round_trip_merged_and_unmerged(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, summary = _model_and_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      trainable_token_indices={"embed_tokens": summary.ids})
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_retriever(tmp_path / "ckpt", model, tokenizer, RetrieverConfig(summary.tokens, summary.ids))
    assert (tmp_path / "ckpt" / "base" / "config.json").is_file()
    ids = torch.randint(0, len(tokenizer), (1, 16))
    ids[0, -3:] = torch.tensor(summary.ids)
    expected = _hidden(model.eval(), ids)
    unmerged = load_retriever(tmp_path / "ckpt")
    assert unmerged.config.adapter
    merged = load_retriever(tmp_path / "ckpt", merge=True)
    torch.testing.assert_close(_hidden(unmerged.model, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_hidden(merged.model, ids), expected, rtol=1e-5, atol=1e-5)


def test_not_a_checkpoint_and_mismatched_config(tmp_path):
    with pytest.raises(ValueError, match="not a convret checkpoint"):
        load_retriever(tmp_path)
    model, tokenizer, summary = _model_and_tokenizer()
    save_retriever(tmp_path / "ckpt", model, tokenizer, RetrieverConfig(summary.tokens, summary.ids))
    config_path = tmp_path / "ckpt" / "convret_config.json"
    data = json.loads(config_path.read_text())
    data["summary_token_ids"] = [i + 1 for i in data["summary_token_ids"]]
    config_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not match"):
        load_retriever(tmp_path / "ckpt")
    data["bogus"] = 1
    config_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown keys"):
        load_retriever(tmp_path / "ckpt")


@pytest.mark.parametrize("family,train_summary", [("llama3", True), ("llama3-tied", True), ("llama3-tied", False),
                                                  ("mistral", True), ("qwen2.5", False)])
def test_lora_training_reloads_to_the_trained_model(tmp_path, model_family, family, train_summary):
    """LoRA `convret train` -> final/ -> load_retriever embeds exactly like the model in memory: the resize the
    summary tokens needed (Llama-3, Mistral: rows = tokenizer size) is redone on the base, and the summary rows, trained
    or only mean-initialised (Qwen2.5's spare rows), are restored."""
    from safetensors import safe_open

    from convret.retrieval.encoder import Encoder, embed_sequences
    from convret.train.arguments import parse_arguments
    from convret.train.main import run
    from convret.train.model import build_model

    base = model_family(family)
    argv = ["--model_name_or_path", str(base), "--tokenizer_name_or_path", str(base), "--lora", "true",
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--train_summary_tokens", str(train_summary),
            "--max_examples", "8", "--num_negatives", "1", "--max_session_len", "128", "--max_passage_len", "64",
            "--max_response_len", "64", "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--learning_rate", "0.01", "--warmup_steps", "0", "--mixed_precision", "no",
            "--output_dir", str(tmp_path / "run"), "--save_steps", "100", "--use_cpu", "true"]
    m, d, l, t = parse_arguments(argv)
    built = build_model(m, d, l)
    initial = built.model.get_base_model().get_input_embeddings().weight[built.config.summary_token_ids].clone()
    assert run(m, d, l, t, built=built) == 0
    trained = built.model.eval()
    loaded = Encoder.from_checkpoint(tmp_path / "run" / "final")
    texts = ["a passage much longer than the others, about rivers and the towns along them " * 3, "short one"]
    sequences = [loaded.passage_tokens(p) for p in texts]
    sequences += [loaded.session_tokens([Turn("user", "where is it"), Turn("assistant", "by the river")], "and then?")]
    expected = embed_sequences(trained, sequences, normalize=True).numpy()
    got = loaded.embed_tokens(sequences)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    assert rows == trained.get_input_embeddings().weight.shape[0] == loaded.config.embedding_rows
    if family != "qwen2.5":
        assert loaded.config.base_embedding_rows == rows - 3  # the summary tokens grew the matrix
    summary_rows = trained.get_base_model().get_input_embeddings()(torch.tensor(built.config.summary_token_ids))
    assert (summary_rows - initial).abs().max() > 0 if train_summary else torch.equal(summary_rows, initial)
    with safe_open(str(tmp_path / "run" / "final" / "adapter_model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if "lora" not in k and "trainable_tokens" not in k]  # no whole matrices
    merged = Encoder.from_checkpoint(tmp_path / "run" / "final", merge=True).embed_tokens(sequences)
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-5)
