"""convret export: SentenceTransformer(OUT) encodes passages (encode / encode_document) and sessions (encode_query)
like convret encode, merged and base + adapter, on inputs longer than the training budgets, for every family."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from convret.data.records import Turn
from convret.retrieval.encoder import Encoder
from convret.retrieval.export import export_sentence_transformers, main as export_main

from _model_matrix import FAMILIES
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


def check_export_equals_convret(st, encoder, rng, text, history=True):
    """encode / encode_document on passages longer than max_passage_len, encode_query on sessions longer than
    max_session_len (through session_text) and on lone queries: equal to convret's embeddings. ``history=False``:
    a template that puts the instruction into the last user message, so that a session with history does not
    start as a lone query does: session_text refuses it."""
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
    if not history:
        for session in sessions[:2]:
            with pytest.raises(ValueError, match="cannot be written as a text"):
                session_texts(encoder, [session])
        sessions = [([], text(rng, 2, 5)), ([], text(rng, 6, 10)), sessions[2]]
    texts = session_texts(encoder, sessions)
    expected_s = encoder.encode_sessions(sessions)
    np.testing.assert_allclose(st.encode_query(texts, convert_to_numpy=True), expected_s, rtol=1e-4, atol=1e-5)
    # a lone query is its own session text: encode_query(query) is convret's session without history
    assert texts[2] == sessions[2][1]
    np.testing.assert_allclose(st.encode_query([q for _, q in sessions], convert_to_numpy=True),
                               encoder.encode_sessions([([], q) for _, q in sessions]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_every_family(tmp_path, model_family, family):
    """A retriever of every model-matrix family, with an instruction and a passage instruction (prompts). Under
    Mistral's template the instruction shares the query's message; under mistral-v0.1's the role markers are
    plain text: in both the query is tokenized together with the text in front of it, and the prompt is that
    text (mistral-v0.1's template has no system role: no instruction)."""
    from sentence_transformers import SentenceTransformer

    instructions = dict(instruction="Find the passage that answers the last question.",
                        passage_instruction="Represent this passage.")
    if family == "mistral-v0.1":
        del instructions["instruction"]
    out = tmp_path / "st"
    ckpt = family_checkpoint(tmp_path / "ckpt", model_family(family), max_passage_len=72, max_session_len=96,
                             **instructions)
    export_sentence_transformers(ckpt, out, merge=True)
    st = SentenceTransformer(str(out), device="cpu")
    if not family.startswith("mistral"):  # one Transformer (mistral: a Router, sessions end with [/INST], passages </s>)
        assert st.max_seq_length == 72 + 3
    words = "the river runs north past old towns where bridges and mills stand by the water".split()
    check_export_equals_convret(st, Encoder.from_checkpoint(ckpt), random.Random(1),
                                lambda rng, lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))),
                                history=family != "mistral")


# ChatML whose user messages are upper-cased: no prompt followed by the query's text gives convret's tokens
UPPER_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
                  "{%- if message['role'] == 'user' %}{{- message['content'] | upper }}"
                  "{%- else %}{{- message['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}")


def test_a_template_no_query_prompt_can_express_exports_the_documents_alone(tmp_path, model_family, capsys):
    """The passages are exported exactly (encode / encode_document); encode_query raises (the Router has no query
    route) rather than embed a session differently from convret; the reason is in convret_export.json."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    import shutil

    family = Path(shutil.copytree(model_family("qwen3"), tmp_path / "upper"))
    tokenizer = AutoTokenizer.from_pretrained(family)
    tokenizer.chat_template = UPPER_TEMPLATE
    tokenizer.save_pretrained(family)
    ckpt = family_checkpoint(tmp_path / "ckpt", family, max_passage_len=40)
    out = tmp_path / "st"
    capsys.readouterr()
    assert export_main([str(ckpt), str(out), "--merge"]) == 0
    assert "passages only; queries not exported: cannot write the query" in capsys.readouterr().err
    assert "not exported" in json.loads((out / "convret_export.json").read_text())["queries"]
    st = SentenceTransformer(str(out), device="cpu")
    encoder = Encoder.from_checkpoint(ckpt)
    words = "the river runs north past old towns where bridges and mills stand by the water".split()
    rng = random.Random(4)
    passages = [" ".join(rng.choice(words) for _ in range(n)) for n in (3, 12, 80)]
    expected = encoder.encode_passages(passages)
    np.testing.assert_allclose(st.encode(passages, convert_to_numpy=True), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.encode_document(passages, convert_to_numpy=True), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="No route found for task type 'query'"):
        st.encode_query(["where is the bridge"])


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
