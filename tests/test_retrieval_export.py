"""convret export: SentenceTransformer(OUT) encodes passages (encode / encode_document) and sessions (encode_query)
like convret encode, merged and base + adapter, on inputs longer than the training budgets, for every family."""
import json
import random

import numpy as np
import pytest
import torch

from convret.data.records import Turn
from convret.retrieval.encoder import Encoder
from convret.retrieval.export import export_sentence_transformers, main as export_main

from _retrieval_fixtures import family_checkpoint, random_text, session_texts, tiny_checkpoint


def _adapter_loading_supported():
    import peft
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    return Version(peft.__version__) >= Version(MIN_PEFT_VERSION)


@pytest.mark.parametrize("lora,merge", [(False, False), (True, False), (True, True)])
def test_sentence_transformers_encode_equals_convret(tmp_path, lora, merge):
    from sentence_transformers import SentenceTransformer

    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=5, lora=lora)
    out = tmp_path / "st"
    if lora and not merge and not _adapter_loading_supported():
        # this environment's peft is older than what transformers' adapter loading needs: a clear error, no output
        with pytest.raises(ValueError, match="upgrade peft, or export a merged model with --merge"):
            export_sentence_transformers(ckpt, out)
        assert not out.exists() and not list(tmp_path.glob(".st.*"))
        return
    assert export_main([str(ckpt), str(out)] + (["--merge"] if merge else [])) == 0
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert (out / "adapter_config.json").exists() == (lora and not merge)
    encoder = Encoder.from_checkpoint(ckpt)
    st = SentenceTransformer(str(out), device="cpu")
    check_export_equals_convret(st, encoder, random.Random(0), random_text)


def check_export_equals_convret(st, encoder, rng, text):
    """encode / encode_document on passages longer than max_passage_len, encode_query on sessions longer than
    max_session_len (through session_text) and on lone queries: equal to convret's embeddings."""
    config = encoder.config
    passages = [text(rng, 1, 6), text(rng, config.max_passage_len, config.max_passage_len * 2), text(rng, 5, 30)]
    assert len(encoder.tokenizer(passages[1], add_special_tokens=False)["input_ids"]) > config.max_passage_len
    # same input ids as convret's formatter, the long passage cut where convret cuts it
    for passage in passages:
        assert st.tokenize([st.prompts["document"] + passage], task="document")["input_ids"][0].tolist() == \
            encoder.passage_tokens(passage)
    expected_p = encoder.encode_passages(passages)
    np.testing.assert_allclose(st.encode(passages, convert_to_numpy=True, batch_size=2), expected_p,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.encode_document(passages, convert_to_numpy=True), expected_p, rtol=1e-4, atol=1e-5)
    turns = []
    while len(encoder.session_tokens(turns, "and then?")) <= config.max_session_len:
        turns += [Turn("user", text(rng, 2, 8)), Turn("assistant", text(rng, 5, 20))]
    sessions = [(turns, text(rng, 2, 5)), (turns[:2], text(rng, 2, 5)), ([], text(rng, 2, 5))]
    texts = session_texts(encoder, sessions)
    expected_s = encoder.encode_sessions(sessions)
    np.testing.assert_allclose(st.encode_query(texts, convert_to_numpy=True), expected_s, rtol=1e-4, atol=1e-5)
    # a lone query is its own session text: encode_query(query) is convret's session without history
    assert texts[2] == sessions[2][1]
    np.testing.assert_allclose(st.encode_query([q for _, q in sessions], convert_to_numpy=True),
                               encoder.encode_sessions([([], q) for _, q in sessions]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3", "llama3-tied", "mistral"])
def test_export_every_family(tmp_path, model_family, family):
    """A retriever of every model-matrix family, with an instruction and a passage instruction (prompts)."""
    from sentence_transformers import SentenceTransformer

    instructions = dict(instruction="Find the passage that answers the last question.",
                        passage_instruction="Represent this passage.")
    out = tmp_path / "st"
    if family == "mistral":  # the instruction is merged into the query's message: not a prompt, a clear error
        ckpt = family_checkpoint(tmp_path / "instructed", model_family(family), **instructions)
        with pytest.raises(ValueError, match="not tokenized on its own"):
            export_sentence_transformers(ckpt, out, merge=True)
        assert not out.exists()
        instructions = dict(passage_instruction="Represent this passage.")
    ckpt = family_checkpoint(tmp_path / "ckpt", model_family(family), max_passage_len=72, max_session_len=96,
                             **instructions)
    export_sentence_transformers(ckpt, out, merge=True)
    st = SentenceTransformer(str(out), device="cpu")
    if family != "mistral":  # one Transformer (mistral: a Router, its sessions end with [/INST], passages </s>)
        assert st.max_seq_length == 72 + 3
    words = "the river runs north past old towns where bridges and mills stand by the water".split()
    check_export_equals_convret(st, Encoder.from_checkpoint(ckpt), random.Random(1),
                                lambda rng, lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))))


def test_summary_on_passages_false_routes_queries_and_documents(tmp_path):
    """Sessions end with the summary tokens, passages do not: a Router with a tokenizer per task (merged)."""
    from sentence_transformers import SentenceTransformer

    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=3, summary_on_passages=False)
    lora = tiny_checkpoint(tmp_path / "lora", seed=3, lora=True, summary_on_passages=False)
    with pytest.raises(ValueError, match="--merge"):
        export_sentence_transformers(lora, tmp_path / "st-lora")
    assert not (tmp_path / "st-lora").exists()
    assert export_main([str(ckpt), str(tmp_path / "st")]) == 0
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    check_export_equals_convret(st, Encoder.from_checkpoint(ckpt), random.Random(2), random_text)
