"""CSITCollator's data-layer options: variable hard negatives (flat / resample / error), stable passage ids,
batches without retrieval examples, the ChatRetriever separator, and CSITLoss passing labels and ids."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from convret import CSITLoss
from convret.collate import CSITCollator, CSITExample, stable_passage_id
from convret.csit import csit_loss

SUMMARY = [120, 121, 122]
PAD = 0


def _tokens_at(batch, positions, length):
    """The ``length`` passage tokens ending just before the summary block at each pooled position."""
    t = len(SUMMARY)
    return [batch.input_ids[b, p - t + 1 - length : p - t + 1].tolist() for b, p in positions.tolist()]


def _examples(rng, counts, with_ids=True, plen=3):
    out = []
    for i, k in enumerate(counts):
        passages = [[rng.randint(1, 99) for _ in range(plen)] for _ in range(k + 1)]
        out.append(CSITExample(session=[rng.randint(1, 99) for _ in range(rng.randint(2, 6))], positive=passages[0],
                               negatives=passages[1:], response=[rng.randint(1, 99)],
                               passage_ids=[f"doc{i}_{j}" for j in range(k + 1)] if with_ids else None))
    return out


def test_flat_layout_keeps_every_negative_and_labels_each_positive():
    rng = random.Random(0)
    examples = _examples(rng, [4, 0, 2, 1])
    batch = CSITCollator(SUMMARY, PAD, max_len=64)(examples)
    assert batch.group_size == 0 and batch.passage_positions.shape[0] == 5 + 1 + 3 + 2
    assert batch.positive_indices.tolist() == [0, 5, 6, 9]
    expected = [p for ex in examples for p in [ex.positive, *ex.negatives]]
    assert _tokens_at(batch, batch.passage_positions, 3) == expected
    assert batch.passage_ids.tolist() == [stable_passage_id(i) for ex in examples for i in ex.passage_ids]
    uniform = CSITCollator(SUMMARY, PAD, max_len=64)(_examples(rng, [2, 2, 2]))
    assert uniform.group_size == 3 and uniform.positive_indices.tolist() == [0, 3, 6]


def test_resample_pads_from_own_negatives_deterministically_and_error_refuses():
    rng = random.Random(1)
    examples = _examples(rng, [3, 1, 2])
    collate = CSITCollator(SUMMARY, PAD, max_len=64, negatives="resample", seed=5)
    batch = collate(examples)
    assert batch.group_size == 4 and batch.positive_indices.tolist() == [0, 4, 8]
    got = _tokens_at(batch, batch.passage_positions, 3)
    for q, ex in enumerate(examples):
        group = got[4 * q : 4 * q + 4]
        assert group[0] == ex.positive
        assert group[1 : 1 + len(ex.negatives)] == list(ex.negatives)  # its own negatives first, all of them
        assert all(neg in ex.negatives for neg in group[1:])  # the padding comes from its own negatives
        ids = batch.passage_ids[4 * q : 4 * q + 4].tolist()
        assert all(stable_passage_id(ex.passage_ids[list(map(list, ex.negatives)).index(n) + 1]) == i
                   for n, i in zip(group[1:], ids[1:]))
    assert torch.equal(collate(examples).input_ids, batch.input_ids)  # deterministic
    capped = CSITCollator(SUMMARY, PAD, max_len=64, negatives="resample", num_negatives=1)(examples)
    assert capped.group_size == 2
    assert _tokens_at(capped, capped.passage_positions, 3)[1] == examples[0].negatives[0]
    with pytest.raises(ValueError, match="no hard negative to resample"):
        collate(_examples(rng, [2, 0]))
    with pytest.raises(ValueError, match="same number"):
        CSITCollator(SUMMARY, PAD, max_len=64, negatives="error")(examples)
    ok = CSITCollator(SUMMARY, PAD, max_len=64, negatives="error", num_negatives=2)(_examples(rng, [2, 2]))
    assert ok.group_size == 3
    with pytest.raises(ValueError, match="negatives must be one of"):
        CSITCollator(SUMMARY, PAD, max_len=64, negatives="pad")


def test_stable_passage_id_is_equal_across_processes():
    ids = ["d1", "MARCO_17", "wiki:5498209", 42]
    code = ("from convret.collate import stable_passage_id; "
            f"print([stable_passage_id(i) for i in {ids!r}])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {str([stable_passage_id(i) for i in ids])}
    assert all(0 <= stable_passage_id(i) < 2**63 for i in ids)
    assert len({stable_passage_id(f"d{i}") for i in range(10000)}) == 10000
    assert stable_passage_id(42) == stable_passage_id("42")


def test_passages_without_ids_are_identified_by_content():
    a = CSITExample([1, 2], [5, 6], [[7, 8]], passage_ids=["p", "n"])
    b = CSITExample([3, 4], [7, 8], [])  # no ids: its positive has the content of a's negative
    batch = CSITCollator(SUMMARY, PAD, max_len=64)([a, b])
    ids = batch.passage_ids.tolist()
    assert ids[0] == stable_passage_id("p") and ids[1] == stable_passage_id("n") and ids[2] != ids[1]
    same = CSITCollator(SUMMARY, PAD, max_len=64)([CSITExample([1], [5, 6], [], passage_ids=["x"]),
                                                   CSITExample([2], [9], [[5, 6]])])
    assert same.passage_ids is not None and len(set(same.passage_ids.tolist())) == 3
    assert CSITCollator(SUMMARY, PAD, max_len=64)([CSITExample([1], [5])]).passage_ids is None


def test_batches_without_retrieval_examples():
    collate = CSITCollator(SUMMARY, PAD, max_len=32)
    lm_only = collate([CSITExample([1, 2, 3], response=[4, 5]), CSITExample([6], response=[7])])
    assert lm_only.num_queries == 0 and lm_only.group_size == 0 and lm_only.positive_indices.numel() == 0
    assert lm_only.passage_positions.shape == (0, 2) and lm_only.passage_ids is None
    with pytest.raises(ValueError, match="neither a positive nor a response"):
        collate([CSITExample([1, 2, 3])])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="hard negatives but no positive"):
        collate([CSITExample([1], negatives=[[2]], response=[3])])
    with pytest.raises(ValueError, match="passage_ids"):
        collate([CSITExample([1], [2], [[3]], passage_ids=["a"])])


def test_separator_opens_every_summary_block():
    sep = 119
    batch = CSITCollator(SUMMARY, PAD, max_len=64, separator_token_id=sep)(
        [CSITExample([1, 2, 3], [4, 5], [[6]], response=[7, 8])])
    ids = batch.input_ids
    for b, p in batch.query_positions.tolist() + batch.passage_positions.tolist():
        assert ids[b, p - 3 : p + 1].tolist() == [sep, *SUMMARY]
    lm_segment = [seg for row in batch.layout.segments for seg in row if seg[2] > 0][0]
    assert lm_segment[1] == 4  # the separator is in the summary span the response sees
    labelled = (batch.labels != -100).nonzero().tolist()
    assert [ids[b, p].item() for b, p in labelled] == [7, 8]


def _oracle_info_nce(q, p, tau, labels, ids):
    logits = (q @ p.T).double() / tau
    if ids is not None:
        same = ids[None, :] == ids[labels][:, None]
        same[torch.arange(len(labels)), labels] = False
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("with_ids", [False, True])
def test_csit_loss_with_labels_and_shared_gold_passages(with_ids):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 16, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(11, 16, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 5, 6, 9])
    ids = torch.tensor([10, 11, 12, 13, 14, 20, 10, 31, 32, 40, 20]) if with_ids else None  # shared golds
    hidden, weight = torch.randn(1, 4, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    lm_labels = torch.tensor([[-100, 3, 4, -100]])
    out = csit_loss(q, p, hidden, weight, lm_labels, temperature=0.05, labels=labels, passage_ids=ids,
                    normalize=False)
    torch.testing.assert_close(out.contrastive, _oracle_info_nce(q, p, 0.05, labels, ids).to(out.contrastive.dtype),
                               rtol=1e-6, atol=1e-6)  # the CPU backend accumulates in fp32


def test_csit_loss_module_uses_positive_indices_and_passage_ids():
    from _tiny import tiny_qwen2

    model = tiny_qwen2(vocab_size=128).double()
    rng = random.Random(3)
    examples = _examples(rng, [3, 0, 1])
    examples[2].passage_ids = ["doc0_0", "doc2_1"]  # example 2's positive is example 0's positive
    examples[2].positive = examples[0].positive
    batch = CSITCollator(SUMMARY, PAD, max_len=64)(examples)
    out = CSITLoss(temperature=0.05, alpha=0.0)(model, batch)
    from convret.collate import pool_hidden
    from convret.csit import decoder_of

    hidden = decoder_of(model)(**batch.model_inputs()).last_hidden_state
    q = F.normalize(pool_hidden(hidden, batch.query_positions), dim=-1)
    p = F.normalize(pool_hidden(hidden, batch.passage_positions), dim=-1)
    expected = _oracle_info_nce(q, p, 0.05, batch.positive_indices, batch.passage_ids)
    torch.testing.assert_close(out.contrastive.double(), expected, rtol=1e-6, atol=1e-6)
    unmasked = _oracle_info_nce(q, p, 0.05, batch.positive_indices, None)
    assert not torch.allclose(expected, unmasked)  # the shared gold is really masked
