"""The model matrix end to end: for every family of tests/_model_matrix.py (tiny Qwen2.5 / Qwen3 / Llama-3 tied
and untied / Mistral models with their families' chat-template behaviour), through the real CLI:

``convret train`` (LoRA, gradient accumulation 2, GradCache chunks, ``--mixed_precision bf16`` on the CPU, 3 steps
on the sample world) -> reload -> ``convret encode`` (passages longer than ``max_passage_len``, sessions longer
than ``max_session_len``) -> ``convret evaluate`` -> ``convret export --merge`` -> ``SentenceTransformer(OUT)``
equal to ``convret encode`` (fp32, 1e-5) -> ``convret generate`` (answers without role words or header tokens).

One training run per family (a module-scoped fixture), shared by the tests of that family. Sizes are the
smallest that still exercise every path: 16 examples, 4 sessions a device batch, 3 steps.
"""
import json
import random

import numpy as np
import pytest

from convret.cli import main as cli
from convret.data.sample_world import COLLECTION, SAMPLE_WORLD_DIR

from _model_matrix import FAMILIES
from _retrieval_fixtures import session_texts

MAX_SESSION_LEN, MAX_PASSAGE_LEN, MAX_RESPONSE_LEN = 96, 64, 64
# one family trains UniConv (triplets, L_CII), the others CSIT: both recipes' data paths run on real templates
RECIPES = {"mistral": "uniconv", "llama3-tied": "uniconv"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small slice of the sample world: 2 conversations (their histories grow past max_session_len), their
    judged passages plus distractors, and passages made longer than max_passage_len."""
    root = tmp_path_factory.mktemp("matrix-world")
    conversations = json.loads((SAMPLE_WORLD_DIR / "eval.json").read_text(encoding="utf-8"))[:2]
    qids = {f"{c['conv_id']}_{t['turn_id']}" for c in conversations for t in c["turns"]}
    qrels = [line for line in (SAMPLE_WORLD_DIR / "qrels.tsv").read_text(encoding="utf-8").splitlines()
             if line.split()[0] in qids]
    judged = {line.split()[2] for line in qrels}
    passages = [json.loads(line) for line in (SAMPLE_WORLD_DIR / COLLECTION).read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)
    kept = [p for p in passages if p["id"] in judged] + rng.sample([p for p in passages if p["id"] not in judged], 12)
    for p in kept[::3]:  # every third passage several times over max_passage_len
        p["text"] = " ".join([p["text"]] * 6)
    (root / "collection.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept), encoding="utf-8")
    (root / "eval.json").write_text(json.dumps(conversations), encoding="utf-8")
    (root / "qrels.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, model_family, world, tmp_path_factory):
    """``convret train`` of one family; ``(family, run directory)``."""
    family = request.param
    base = model_family(family)
    run = tmp_path_factory.mktemp(f"matrix-{family}")
    recipe = RECIPES.get(family, "csit")
    argv = ["train", "--model_name_or_path", str(base), "--tokenizer_name_or_path", str(base),
            "--recipe", recipe, "--lora", "true", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_target_modules", "q_proj", "v_proj", "--max_examples", "16", "--num_negatives", "1",
            "--max_session_len", str(MAX_SESSION_LEN), "--max_passage_len", str(MAX_PASSAGE_LEN),
            "--max_response_len", str(MAX_RESPONSE_LEN), "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--gradcache_chunk_rows", "2", "--mixed_precision", "bf16",
            "--max_steps", "3", "--learning_rate", "0.001", "--warmup_steps", "0", "--logging_steps", "1",
            "--save_steps", "100", "--output_dir", str(run / "run"), "--use_cpu", "true", "--report_to", "none",
            "--seed", "1"]
    return family, run, cli(argv)


def _final(trained):
    family, run, rc = trained
    if rc != 0:
        pytest.fail(f"convret train of {family} exited with {rc}")
    return run / "run" / "final"


def test_train_reload_encode_evaluate(trained, world):
    """3 optimizer steps logged; the LoRA checkpoint reloads on its base (resize redone where the summary tokens
    needed one); convret encode and convret evaluate run on it."""
    from convret.retrieval.embeddings import read_embeddings
    from convret.retrieval.encoder import Encoder

    final = _final(trained)
    _, run, _ = trained
    config = json.loads((final / "convret_config.json").read_text())
    assert config["adapter"] and config["extra"]["global_step"] == 3
    steps = [json.loads(line) for line in (run / "run" / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    encoder = Encoder.from_checkpoint(final)
    assert encoder.model.get_input_embeddings().weight.shape[0] == config["embedding_rows"]
    for kind, source in (("passages", "--collection"), ("sessions", "--conversations")):
        path = world / ("collection.jsonl" if kind == "passages" else "eval.json")
        assert cli(["encode", "--model", str(final), source, str(path), "--output", str(run / kind),
                    "--no-progress"]) == 0
        ids, vectors, _ = read_embeddings(run / kind)
        assert vectors.shape == (len(ids), encoder.dim) and np.isfinite(vectors).all()
    ids, vectors, _ = read_embeddings(run / "passages")
    long_id = json.loads((world / "collection.jsonl").read_text().splitlines()[0])["id"]
    passages = {json.loads(line)["id"]: json.loads(line)["text"]
                for line in (world / "collection.jsonl").read_text().splitlines()}
    assert len(encoder.tokenizer(passages[long_id], add_special_tokens=False)["input_ids"]) > MAX_PASSAGE_LEN
    # the CLI's vectors are the reloaded model's
    np.testing.assert_allclose(vectors[ids.index(long_id)], encoder.encode_passages([passages[long_id]])[0],
                               rtol=0, atol=1e-6)
    assert cli(["evaluate", "--model", str(final), "--conversations", str(world / "eval.json"), "--collection",
                str(world / "collection.jsonl"), "--qrels", str(world / "qrels.tsv"), "--contexts",
                "--output", str(run / "evaluation")]) == 0
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert results


def test_export_equals_convret_encode(trained, world):
    """`convret export --merge` -> SentenceTransformer(OUT): passages (longer than max_passage_len) and sessions
    (longer than max_session_len, given as session_text) embed as `convret encode` embedded them."""
    from sentence_transformers import SentenceTransformer

    from convret.data import SequenceFormatter
    from convret.retrieval._data import iter_conversations
    from convret.retrieval.embeddings import read_embeddings
    from convret.retrieval.encoder import Encoder

    final = _final(trained)
    _, run, _ = trained
    if not (run / "sessions").exists():
        pytest.skip("needs test_train_reload_encode_evaluate's encodings")
    out = run / "st"
    assert cli(["export", str(final), str(out), "--merge"]) == 0
    st = SentenceTransformer(str(out), device="cpu")
    ids, expected, _ = read_embeddings(run / "passages")
    texts = {json.loads(line)["id"]: json.loads(line)["text"]
             for line in (world / "collection.jsonl").read_text().splitlines()}
    got = st.encode_document([texts[i] for i in ids], convert_to_numpy=True, batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    encoder = Encoder.from_checkpoint(final)
    turns = list(iter_conversations(world / "eval.json"))
    unlimited = SequenceFormatter(encoder.tokenizer, max_session_len=None)
    assert max(len(unlimited.session(t.history, t.query)) for t in turns) > MAX_SESSION_LEN  # truncation runs
    ids, expected, _ = read_embeddings(run / "sessions")
    by_qid = {t.qid: t for t in turns}
    queries = session_texts(encoder, [(by_qid[q].history, by_qid[q].query) for q in ids])
    got = st.encode_query(queries, convert_to_numpy=True, batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_generate_answers_without_role_words(trained, world):
    """`convret generate`: answers carry no role word, header or special token of the template."""
    final = _final(trained)
    _, run, _ = trained
    out = run / "generated.jsonl"
    assert cli(["generate", "--model", str(final), "--conversations", str(world / "eval.json"), "--output",
                str(out), "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(0 <= r["f1"] <= 1 for r in rows)
    from convret.train.checkpoint import load_retriever

    tokenizer = load_retriever(final).tokenizer
    specials = [t for t in tokenizer.all_special_tokens if t]
    for row in rows:
        answer = row["response"]
        assert not any(s in answer for s in specials), row
        assert not answer.lower().startswith(("assistant", "system", "user")), row
