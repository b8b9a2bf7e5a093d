"""The bundled sample world: regenerates byte for byte, every reader parses it, it needs the context, and the
tokenizer and tiny model configs beside it load."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from convret.data import (SequenceFormatter, Turn, read_collection, read_conversations, read_qrels,
                          read_training, ReadReport)
from convret.data import sample_world as sw

DOCS = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def test_regenerates_byte_for_byte():
    assert sw.check() == []
    assert sw.main(["--check"]) == 0


def test_small_world_is_deterministic_and_different_seeds_differ(tmp_path):
    small = sw.WorldSizes(pairs_per_category=4, train_sessions=20, eval_turns=30)
    sw.generate(tmp_path / "a", small, quiet=True)
    sw.generate(tmp_path / "b", small, quiet=True)
    sw.generate(tmp_path / "c", small, seed=sw.SEED + 7, quiet=True)
    assert sw.file_hashes(tmp_path / "a") == sw.file_hashes(tmp_path / "b")
    assert sw.file_hashes(tmp_path / "a")[sw.EVAL] != sw.file_hashes(tmp_path / "c")[sw.EVAL]
    assert sw.check(tmp_path / "a", small) == []
    (tmp_path / "a" / sw.QRELS).write_text("tampered\n")
    assert sw.check(tmp_path / "a", small) == [sw.QRELS]


def _read_all():
    d = sw.SAMPLE_WORLD_DIR
    reports = {name: ReadReport() for name in sw.DATA_FILES}
    passages = {p.id: p for p in read_collection(d / sw.COLLECTION, strict=True, report=reports[sw.COLLECTION])}
    ultrachat = list(read_training(d / sw.TRAIN_ULTRACHAT, strict=True, report=reports[sw.TRAIN_ULTRACHAT]))
    triplets = list(read_training(d / sw.TRAIN_TRIPLETS, strict=True, report=reports[sw.TRAIN_TRIPLETS]))
    evals = list(read_conversations(d / sw.EVAL, strict=True, report=reports[sw.EVAL]))
    contexts = [list(read_conversations(d / name, strict=True, report=reports[name])) for name in sw.EVAL_CONTEXTS]
    qrels = read_qrels(d / sw.QRELS, strict=True)
    return reports, passages, ultrachat, triplets, evals, contexts, qrels


def test_every_reader_parses_the_sample_world():
    reports, passages, ultrachat, triplets, evals, contexts, qrels = _read_all()
    stats = json.loads((sw.SAMPLE_WORLD_DIR / sw.STATS).read_text())
    assert reports[sw.TRAIN_ULTRACHAT].format == "ultrachat" and reports[sw.TRAIN_TRIPLETS].format == "topiocqa"
    assert reports[sw.EVAL].format == "chatretriever-eval"
    assert all(reports[name].format == "qrecc" for name in sw.EVAL_CONTEXTS)
    assert len(passages) == stats["passages"] >= 2000
    assert len(ultrachat) == len(triplets) == stats["train_turns"] and stats["train_sessions"] >= 1000
    assert len(evals) == stats["eval_turns"] == 200
    for ex, tri in zip(ultrachat, triplets):
        assert ex.id == tri.id and ex.query == tri.query
        assert ex.positive.id == tri.positive.id and ex.positive.text == passages[ex.positive.id].text
        assert 1 <= len(ex.negatives) <= 2 and all(passages[n.id].text == n.text for n in ex.negatives)
        assert ex.positive.id not in {n.id for n in ex.negatives}
        assert tri.response != tri.positive.text and tri.rewrite  # a separate short answer
    qids = [t.qid for t in evals]
    assert len(set(qids)) == len(qids) and set(qids) == set(qrels)
    for version in contexts:
        assert [t.qid for t in version] == qids and [t.query for t in version] == [t.query for t in evals]
    assert any(a.history != b.history for a, b in zip(evals, contexts[0]) if a.history)
    assert all(len(c.history) == len(e.history) + 2 for e, c in zip(evals, contexts[1]))  # a distractor exchange
    for qid, judged in qrels.items():
        assert sorted(judged.values()) == [1, 1, 1, 1, 2] and all(d in passages for d in judged)


def _name_in_rewrite(rewrite: str) -> str:
    names = [w.strip("?.,:") for w in rewrite.split()[1:] if w[0].isupper()]
    assert len(names) == 1, rewrite
    return names[0]


def test_it_needs_the_context_at_the_documented_fraction():
    _, _, _, _, evals, _, _ = _read_all()
    dependent = sum(_name_in_rewrite(t.rewrite) not in t.query for t in evals)
    stats = json.loads((sw.SAMPLE_WORLD_DIR / sw.STATS).read_text())
    assert dependent == stats["context_dependent_eval_turns"]
    assert dependent / len(evals) >= 0.5
    assert f"{dependent}/{len(evals)}" in DOCS.read_text() and f"{dependent / len(evals):.1%}" in DOCS.read_text()


def test_tokenizer_and_tiny_configs_load():
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sw.TOKENIZER_DIR)
    assert 2000 <= len(tok) <= 4000 and tok.chat_template
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    fmt = SequenceFormatter(tok, max_session_len=64)
    assert fmt.uses_chat_template
    session = fmt.session([Turn("user", "How long is the Korval river?"), Turn("assistant", "About 420 km.")],
                          "What fish live in it?")
    assert tok.decode(session) == ("<|im_start|>user\nHow long is the Korval river?<|im_end|>\n<|im_start|>assistant"
                                   "\nAbout 420 km.<|im_end|>\n<|im_start|>user\nWhat fish live in it?<|im_end|>\n")
    for path, low, high in ((sw.TINY_MODEL_CONFIG, 2e6, 8e6), (sw.TINY_TEST_MODEL_CONFIG, 1e5, 1e6)):
        config = AutoConfig.from_pretrained(path)
        assert config.model_type == "qwen2" and config.vocab_size == len(tok)
        assert config.head_dim in (32, 64, 128)
        h, i, n, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim
        params = 2 * config.vocab_size * h + n * (2 * h * h + 2 * h * config.num_key_value_heads * kv + 3 * h * i)
        assert low <= params <= high


def test_adhoc_file_is_single_turn_tevatron_over_the_collection():
    """The MS MARCO-like source of a two-source mixture: one query naming its entity, its gold passage from the
    collection, no negatives (convret mine adds them)."""
    d = sw.SAMPLE_WORLD_DIR
    stats = json.loads((d / sw.STATS).read_text())
    passages = {p.id: p for p in read_collection(d / sw.COLLECTION, strict=True)}
    report = ReadReport()
    adhoc = list(read_training(d / sw.TRAIN_ADHOC, strict=True, report=report))
    assert report.format == "tevatron" and len(adhoc) == stats["adhoc_queries"] == 1000
    assert len({ex.id for ex in adhoc}) == len(adhoc)
    for ex in adhoc:
        assert ex.history == [] and ex.negatives == [] and ex.response is None
        assert passages[ex.positive.id].text == ex.positive.text
        assert not ex.query.endswith("?") and ex.query[0].islower()
    assert (d / sw.TRAIN_ADHOC).stat().st_size < 300_000
