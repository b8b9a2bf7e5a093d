"""Tiny retriever checkpoints and text fixtures for the retrieval tests (nothing downloaded)."""
from __future__ import annotations

import json
import random

import torch

from convret.data.summary_tokens import add_summary_tokens
from convret.train.checkpoint import RetrieverConfig, save_retriever

from _tiny import tiny_qwen2, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]


def tiny_checkpoint(path, seed: int = 0, lora: bool = False, normalize: bool = True, **config):
    """A random tiny Qwen2 retriever saved with save_retriever (weights perturbed so nothing is symmetric)."""
    tokenizer = word_tokenizer()
    model = tiny_qwen2(len(tokenizer), seed=seed)
    summary = add_summary_tokens(model, tokenizer, 3)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 trainable_token_indices={"embed_tokens": summary.ids}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    cfg = RetrieverConfig(summary.tokens, summary.ids, normalize=normalize, max_session_len=200,
                          max_passage_len=60, **config)
    save_retriever(path, model, tokenizer, cfg)
    return path


def family_checkpoint(path, family_dir, **config):
    """A retriever checkpoint of a model-matrix family (random weights, summary tokens added)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
    summary = add_summary_tokens(model, tokenizer, 3)
    defaults = dict(max_session_len=256, max_passage_len=128, max_response_len=128)
    save_retriever(path, model, tokenizer, RetrieverConfig(summary.tokens, summary.ids, **{**defaults, **config}))
    return path


def session_texts(encoder, sessions):
    """session_text() of ``(history, query)`` sessions (the text to give ``SentenceTransformer.encode_query``)."""
    from convret.retrieval.export import session_text

    return [session_text(encoder.tokenizer, encoder.config, h, q) for h, q in sessions]


def random_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_collection(path, n: int, seed: int = 0, lo: int = 3, hi: int = 40):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"d{i}", "text": random_text(rng, lo, hi)}) + "\n")
    return path


def write_eval_world(directory, n_conv: int = 4, turns: int = 3, seed: int = 0, shuffle_context: int | None = None):
    """A ChatRetriever-style eval file, a collection holding every turn's gold passage plus distractors, and
    graded qrels. ``shuffle_context``: a different, seeded history text (same qids) for robustness files."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    passages, qrels, convs = [], [], []
    for c in range(n_conv):
        turn_list = []
        for t in range(1, turns + 1):
            gold = f"g{c}_{t}"
            passages.append({"id": gold, "text": random_text(rng, 5, 20)})
            qrels.append(f"{c}_{t} 0 {gold} {rng.choice([1, 2])}\n")
            ctx = random.Random((shuffle_context or 0) * 1000 + c * 10 + t)
            turn_list.append({"turn_id": t, "question": random_text(rng, 2, 6),
                              "response": random_text(ctx if shuffle_context else rng, 3, 9),
                              "manual_rewrite": random_text(rng, 3, 8)})
        convs.append({"conv_id": str(c), "turns": turn_list})
    passages += [{"id": f"x{i}", "text": random_text(rng, 3, 30)} for i in range(20)]
    (directory / "collection.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    (directory / "qrels.tsv").write_text("".join(qrels))
    name = "eval.json" if shuffle_context is None else f"eval_context_{shuffle_context}.json"
    (directory / name).write_text(json.dumps(convs))
    return directory
