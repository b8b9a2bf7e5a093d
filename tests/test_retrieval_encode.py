"""convret encode: packed-layout embeddings equal one-at-a-time HF eager embeddings; shards resume."""
import json
import random

import numpy as np
import pytest
import torch

from convret.data.records import Turn
from convret.retrieval import embeddings as emb_mod
from convret.retrieval.embeddings import read_embeddings
from convret.retrieval.encode import collection_items, encode_to_dir, main as encode_main
from convret.retrieval.encoder import Encoder, decoder_of, embed_sequences, pack_by_budget
from convret.train.checkpoint import load_retriever

from _retrieval_fixtures import random_text, tiny_checkpoint, write_collection


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


def _eager_oracle(path, sequences, normalize=True):
    """Each sequence alone, HF eager attention with an explicit 4D additive causal mask, float64."""
    model = load_retriever(path, attn_implementation="eager", dtype=torch.float64).model
    out = []
    with torch.no_grad():
        for seq in sequences:
            n = len(seq)
            mask = torch.full((1, 1, n, n), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
            hidden = decoder_of(model)(input_ids=torch.tensor([seq]), attention_mask=mask,
                                       use_cache=False).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(hidden, dim=-1) if normalize else hidden)
    return torch.stack(out).float()


def test_pack_by_budget_covers_every_sequence_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(40)] + [120]
    rows = pack_by_budget(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    for r in rows:
        assert len(r) == 1 or sum(lengths[i] for i in r) <= 64


def test_packed_embeddings_equal_eager_one_at_a_time(ckpt):
    encoder = Encoder.from_checkpoint(ckpt, token_budget=70)
    rng = random.Random(1)
    history = [Turn("user", random_text(rng, 3, 10)), Turn("assistant", random_text(rng, 5, 30))]
    sequences = [encoder.passage_tokens(random_text(rng, 1, 50)) for _ in range(9)]
    sequences += [encoder.session_tokens(history, random_text(rng, 2, 8)),
                  encoder.session_tokens(history * 3, random_text(rng, 2, 8))]  # > the budget: a row of its own
    assert max(map(len, sequences)) > 70
    for seq in sequences:
        assert seq[-3:] == encoder.config.summary_token_ids
    got = embed_sequences(encoder.model, sequences, token_budget=70, normalize=True)
    torch.testing.assert_close(got, _eager_oracle(ckpt, sequences), rtol=1e-4, atol=1e-5)


def test_unnormalized_lora_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path / "lora", seed=3, lora=True, normalize=False)
    encoder = Encoder.from_checkpoint(path, token_budget=64)
    sequences = [encoder.passage_tokens(f"w{i} w{i + 1} w{2 * i}") for i in range(6)]
    got = torch.from_numpy(encoder.embed_tokens(sequences))
    torch.testing.assert_close(got, _eager_oracle(path, sequences, normalize=False), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(len(sequences)))


def test_encode_cli_writes_the_documented_layout(ckpt, tmp_path):
    coll = write_collection(tmp_path / "c.jsonl", 11, seed=2)
    out = tmp_path / "emb"
    assert encode_main(["--model", str(ckpt), "--collection", str(coll), "--output", str(out),
                        "--shard-size", "4", "--token-budget", "64", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 11 and meta["dim"] == 128 and meta["normalized"] and meta["dtype"] == "float32"
    assert [s["count"] for s in meta["shards"]] == [4, 4, 3]
    assert (out / "part-00002.ids").read_text().splitlines() == ["d8", "d9", "d10"]
    ids, vectors, _ = read_embeddings(out)
    assert ids == [f"d{i}" for i in range(11)]
    encoder = Encoder.from_checkpoint(ckpt)
    _, sequences = collection_items(coll, encoder)
    torch.testing.assert_close(torch.from_numpy(vectors), _eager_oracle(ckpt, sequences), rtol=1e-4, atol=1e-5)
    half = tmp_path / "half"
    assert encode_main(["--model", str(ckpt), "--collection", str(coll), "--output", str(half), "--dtype",
                        "float16", "--no-progress"]) == 0
    assert np.load(half / "part-00000.npy").dtype == np.float16
    np.testing.assert_allclose(read_embeddings(half)[1], vectors, atol=2e-3)


def test_interrupted_encode_resumes(ckpt, tmp_path, monkeypatch):
    coll = write_collection(tmp_path / "c.jsonl", 10, seed=4)
    encoder = Encoder.from_checkpoint(ckpt, token_budget=64)
    ids, sequences = collection_items(coll, encoder)
    out = tmp_path / "emb"
    real_write = emb_mod.write_shard
    calls = []

    def crash_on_third(directory, index, *args):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        real_write(directory, index, *args)

    import convret.retrieval.encode as encode_mod
    monkeypatch.setattr(encode_mod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        encode_to_dir(encoder, ids, sequences, out, shard_size=3, progress=False)
    assert not (out / "meta.json").exists()
    assert not list(out.glob(".*tmp"))  # the atomic writer cleaned its temporary file
    # shard 1 also half-written by a hard kill: its .npy truncated
    (out / "part-00001.npy").write_bytes((out / "part-00001.npy").read_bytes()[:50])
    monkeypatch.setattr(encode_mod, "write_shard", real_write)
    encoded = []
    real_embed = encoder.embed_tokens
    encoder.embed_tokens = lambda seqs, progress=None: (encoded.append(len(seqs)), real_embed(seqs, progress))[1]
    encode_to_dir(encoder, ids, sequences, out, shard_size=3, progress=False)
    assert encoded == [3, 3, 1]  # shard 0 kept; 1 (truncated), 2 (never written) and 3 encoded
    got_ids, vectors, meta = read_embeddings(out)
    assert got_ids == ids and meta["count"] == 10
    np.testing.assert_allclose(vectors, real_embed(sequences), rtol=1e-5, atol=1e-6)


def test_two_ranks_write_their_own_shards(ckpt, tmp_path):
    coll = write_collection(tmp_path / "c.jsonl", 7, seed=5)
    encoder = Encoder.from_checkpoint(ckpt, token_budget=64)
    ids, sequences = collection_items(coll, encoder)
    out = tmp_path / "emb"
    assert encode_to_dir(encoder, ids, sequences, out, shard_size=2, rank=1, world_size=2, progress=False) is None
    assert sorted(p.name for p in out.glob("part-*.ids")) == ["part-00001.ids", "part-00003.ids"]
    meta = encode_to_dir(encoder, ids, sequences, out, shard_size=2, rank=0, world_size=2, progress=False)
    assert meta["count"] == 7
    got_ids, vectors, _ = read_embeddings(out)
    assert got_ids == ids
    np.testing.assert_allclose(vectors, encoder.embed_tokens(sequences), rtol=1e-5, atol=1e-6)


def test_bad_inputs_give_clear_errors(ckpt, tmp_path, capsys):
    def run(*extra):
        capsys.readouterr()
        code = encode_main(["--model", str(ckpt), "--output", str(tmp_path / "out"), "--no-progress", *extra])
        return code, capsys.readouterr().err

    (tmp_path / "empty.jsonl").write_text("")
    code, err = run("--collection", str(tmp_path / "empty.jsonl"))
    assert code == 1 and "empty" in err
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "w1"}\n{"id": "b", "text": "w2"}\n'
                                        '{"id": "a", "text": "w3"}\n')
    code, err = run("--collection", str(tmp_path / "dup.jsonl"))
    assert code == 1 and "duplicate passage id 'a'" in err
    assert not (tmp_path / "out" / "meta.json").exists()
    # a checkpoint whose config names summary tokens the tokenizer and model do not have
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "convret_config.json").read_text())
    cfg["summary_token_ids"] = [i + 100 for i in cfg["summary_token_ids"]]
    (bad / "convret_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert encode_main(["--model", str(bad), "--collection", str(tmp_path / "dup.jsonl"), "--output",
                        str(tmp_path / "out2")]) == 1
    assert "do not match" in capsys.readouterr().err
    code, err = run("--collection", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "missing.jsonl" in err
