"""convret generate: dropping the session's KV after the prefill equals greedy decoding under the dense session
mask (HF eager, explicit 4D additive mask); metrics."""
import json

import pytest
import torch

from convret.layout import SessionLayout
from convret.retrieval.generate import generate_response, main as generate_main, token_f1
from convret.train.checkpoint import load_retriever

from _retrieval_fixtures import family_checkpoint, tiny_checkpoint, write_eval_world


def _dense_greedy(model, prefix, summary, steps, forced=()):
    tokens = list(prefix) + list(summary)
    p, t = len(prefix), len(summary)
    generated = list(forced)  # the response's given start: response tokens like the generated ones
    with torch.no_grad():
        for _ in range(steps):
            seq = tokens + generated
            layout = SessionLayout.from_segments([[(p, t, len(generated))]], len(seq))
            allowed = layout.dense_mask()[:, None]
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
            logits = model(input_ids=torch.tensor([seq]), attention_mask=mask, position_ids=layout.position_ids(),
                           use_cache=False).logits
            generated.append(int(logits[0, -1].argmax()))
    return generated[len(forced):]


def test_kv_dropping_equals_dense_session_mask(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m", seed=11, normalize=False)
    fast = load_retriever(ckpt)
    eager = load_retriever(ckpt, attn_implementation="eager")
    summary = fast.config.summary_token_ids
    torch.manual_seed(0)
    for prefix_len in (5, 40):
        prefix = torch.randint(4, 60, (prefix_len,)).tolist()
        got = generate_response(fast.model, prefix, summary, max_new_tokens=12)
        assert len(got) == 12
        assert got == _dense_greedy(eager.model, prefix, summary, 12)
        forced = generate_response(fast.model, prefix, summary, max_new_tokens=10, forced=[7, 30, 2])
        assert forced == _dense_greedy(eager.model, prefix, summary, 10, forced=[7, 30, 2])
    # the prefix is invisible: a different session with the same summary-token states would not be, so check
    # that the session does change the answer (the summary tokens carry it)
    a = generate_response(fast.model, [5] * 30, summary, max_new_tokens=8)
    b = generate_response(fast.model, [9, 17] * 15, summary, max_new_tokens=8)
    assert a != b


def test_token_f1():
    assert token_f1("The cat sat", "the cat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "x") == 0.0 and token_f1("a b", "c") == 0.0


def test_generate_cli(tmp_path, capsys):
    root = write_eval_world(tmp_path / "w", n_conv=2, turns=2)
    ckpt = tiny_checkpoint(tmp_path / "m", seed=2)
    run = tmp_path / "run.trec"
    run.write_text("0_1 Q0 g0_1 1 0.9 t\n0_1 Q0 x3 2 0.5 t\n")
    assert generate_main(["--model", str(ckpt), "--conversations", str(root / "eval.json"), "--run", str(run),
                          "--collection", str(root / "collection.jsonl"), "--passages", "2", "--output",
                          str(tmp_path / "gen.jsonl"), "--max-new-tokens", "6"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["qid"] for r in rows] == ["0_1", "0_2", "1_1", "1_2"]
    assert all(0 <= r["rougeL"] <= 1 and 0 <= r["f1"] <= 1 for r in rows)
    assert "ROUGE-L" in capsys.readouterr().out
    run.write_text("0_1 Q0 nope 1 0.9 t\n")
    assert generate_main(["--model", str(ckpt), "--conversations", str(root / "eval.json"), "--run", str(run),
                          "--collection", str(root / "collection.jsonl"), "--output", str(tmp_path / "g2.jsonl")]) == 1
    assert not (tmp_path / "g2.jsonl").exists()


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3", "mistral"])
def test_exact_reproduction_scores_one(tmp_path, model_family, monkeypatch, family):
    """A model that generates exactly the response tokens it was trained on (the formatter's rendering of the
    reference, wrapper included) gets its reference back: token F1 and ROUGE-L 1.0, no role word or header."""
    import convret.retrieval.generate as generate_module
    from convret.retrieval._data import iter_conversations
    from convret.retrieval.encoder import Encoder

    root = write_eval_world(tmp_path / "w", n_conv=1, turns=3)
    ckpt = family_checkpoint(tmp_path / "m", model_family(family))
    encoder = Encoder.from_checkpoint(ckpt)
    fmt = encoder.formatter
    targets = {tuple(fmt.session(t.history, t.query)): fmt.response(t.response)
               for t in iter_conversations(root / "eval.json")}

    def reproduce(model, prefix, summary, max_new_tokens=64, eos_token_ids=(), forced=(), stop_sequence=()):
        target = targets[tuple(prefix)]
        assert target[: len(forced)] == list(forced)  # what is given must be the target's start
        out = []
        for token in target[len(forced):]:
            if token in eos_token_ids:
                break
            out.append(token)
            if stop_sequence and out[-len(stop_sequence):] == list(stop_sequence):
                break
        return out

    monkeypatch.setattr(generate_module, "generate_response", reproduce)
    assert generate_main(["--model", str(ckpt), "--conversations", str(root / "eval.json"),
                          "--output", str(tmp_path / "gen.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["response"] == row["reference"] and row["f1"] == 1.0 and row["rougeL"] == 1.0, row


def test_generate_passes_the_cache_under_the_models_own_keyword(tmp_path):
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); older
    versions know only the old name. Generation must use whichever the model's forward takes, through a PEFT
    wrapper too."""
    import warnings

    from peft import LoraConfig, get_peft_model

    ckpt = tiny_checkpoint(tmp_path / "m", seed=11, normalize=False)
    model = load_retriever(ckpt).model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    summary = load_retriever(ckpt).config.summary_token_ids
    for m in (model, wrapped):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = generate_response(m, [5, 6, 7], summary, max_new_tokens=4, forced=[7])
        assert len(out) == 4
        assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
