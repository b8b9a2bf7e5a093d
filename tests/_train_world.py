"""A tiny training world for the trainer tests: word tokenizer, tiny Qwen2 config, TrainingExamples, and a
formatter with the SequenceFormatter interface (session / passage / response / example)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from convret.collate import CSITExample
from convret.data.records import Passage, TrainingExample, Turn

WORDS = [f"w{i}" for i in range(60)] + ["user", "assistant", "system", "tell", "me", "about", "the"]


class WordFormatter:
    """Whitespace word ids, ChatML-ish markers; truncation like the real formatter (sessions keep their end)."""

    def __init__(self, tokenizer, max_session_len=48, max_passage_len=16, max_response_len=16):
        self.tok = tokenizer
        self.max_session_len, self.max_passage_len, self.max_response_len = (max_session_len, max_passage_len,
                                                                            max_response_len)

    def _ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def session(self, history, query):
        ids = []
        for turn in [*history, Turn("user", query)]:
            ids += self._ids(f"<|im_start|> {turn.role} {turn.text} <|im_end|>")
        return ids[-self.max_session_len:]

    def passage(self, passage):
        text = passage.text if isinstance(passage, Passage) else passage
        return self._ids(f"<|im_start|> assistant {text} <|im_end|>")[: self.max_passage_len]

    def response(self, text):
        return self._ids(text)[: self.max_response_len]

    def session_with_passages(self, history, query, passages):
        return self.session(history, query) + [i for p in passages for i in self.passage(p)]

    def example(self, ex):
        kwargs = {}
        if ex.positive is not None and "passage_ids" in CSITExample.__dataclass_fields__:
            kwargs["passage_ids"] = [ex.positive.id, *[n.id for n in ex.negatives]]
        return CSITExample(
            session=self.session(ex.history, ex.query),
            positive=None if ex.positive is None else self.passage(ex.positive),
            negatives=[self.passage(n) for n in ex.negatives],
            response=None if ex.response is None else self.response(ex.response), **kwargs)


def make_examples(n=24, negatives=2, seed=0, triplets=False, lm_only=()):
    """Sessions about an entity wK; the positive names it, negatives name others; response differs from the
    passage in triplet mode."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        entity = rng.randrange(40)
        attr = rng.randrange(40, 60)
        history = [Turn("user", f"tell me about w{entity}"), Turn("assistant", f"w{entity} w{rng.randrange(60)}")]
        positive = Passage(f"p{entity}_{attr}", f"w{entity} w{attr} w{rng.randrange(60)}")
        negs = []
        for _ in range(negatives):
            other = (entity + rng.randrange(1, 40)) % 40
            negs.append(Passage(f"p{other}_{attr}", f"w{other} w{attr} w{rng.randrange(60)}"))
        response = f"w{attr} w{entity} the" if triplets else positive.text
        if i in lm_only:  # an LM-only example: no positive, no negatives
            positive, negs = None, []
        out.append(TrainingExample(f"c{i}_1", history, f"the w{attr}", positive, negs, response))
    return out


def tiny_model_config(path: Path, vocab_size: int, **overrides) -> Path:
    config = {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "max_position_embeddings": 256, "tie_word_embeddings": False, **overrides}
    path.write_text(json.dumps(config))
    return path


def make_mixture(first, weights, negatives=2, second_size=None, seed=1):
    """A two-source MixtureDataset: ``first`` ("a") and a second set of examples ("b", other ids and texts)."""
    from convret.train.mixture import MixtureDataset

    second = make_examples(second_size or max(len(first) // 2, 1), negatives=negatives, seed=seed)
    for ex in second:
        ex.id = "b" + ex.id
    return MixtureDataset([("a", weights[0], first), ("b", weights[1], second)])
