"""convret export: SentenceTransformer(OUT).encode equals convret encode, merged and base + adapter."""
import json
import random

import numpy as np
import pytest
import torch

from convret.data.records import Turn
from convret.retrieval.encoder import Encoder
from convret.retrieval.export import export_sentence_transformers, main as export_main, session_text

from _retrieval_fixtures import random_text, tiny_checkpoint


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
    rng = random.Random(0)
    passages = [random_text(rng, 1, 30) for _ in range(5)]
    history = [Turn("user", random_text(rng, 2, 6)), Turn("assistant", random_text(rng, 4, 12))]
    sessions = [(history, random_text(rng, 2, 5)), ([], random_text(rng, 2, 5))]
    # same input ids as convret's formatter
    assert st.tokenize([st.prompts["document"] + passages[0]])["input_ids"][0].tolist() == \
        encoder.passage_tokens(passages[0])
    expected_p = encoder.encode_passages(passages)
    got_p = st.encode(passages, convert_to_numpy=True, batch_size=3)
    np.testing.assert_allclose(got_p, expected_p, rtol=1e-4, atol=1e-5)
    texts = [session_text(encoder.tokenizer, encoder.config, h, q) for h, q in sessions]
    got_s = st.encode_query(texts, convert_to_numpy=True)
    np.testing.assert_allclose(got_s, encoder.encode_sessions(sessions), rtol=1e-4, atol=1e-5)
