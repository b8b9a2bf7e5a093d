"""One-pass CSIT: the collator's packing, and the one-pass step against the reference four-forward step."""
from __future__ import annotations

import random

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from convret import SessionLayout
from convret.baselines import additive_mask
from convret.collate import CSITCollator, CSITExample, pool_hidden

SUMMARY = [120, 121, 122]
PAD = 0


def random_examples(rng: random.Random, count: int, negatives: int, with_response=True, vocab=100):
    def text(lo, hi):
        return [rng.randint(1, vocab - 1) for _ in range(rng.randint(lo, hi))]

    return [
        CSITExample(session=text(3, 14), positive=text(2, 9), negatives=[text(2, 9) for _ in range(negatives)],
                    response=text(1, 8) if with_response else None)
        for _ in range(count)
    ]


def sample_spans(batch):
    """(row, start, segment) of every packed sample, in row order."""
    spans = []
    for b, row in enumerate(batch.layout.segments):
        pos = 0
        for seg in row:
            spans.append((b, pos, seg))
            pos += sum(seg)
    return spans


@pytest.mark.parametrize("query_from_lm_sample", [False, True])
def test_collator_packs_every_sample_once_with_labels_and_positions(query_from_lm_sample):
    rng = random.Random(7)
    examples = random_examples(rng, 5, negatives=2)
    examples[1].response = None  # a retrieval-only example
    examples.append(CSITExample(session=[5, 6, 7], response=[8, 9]))  # an LM-only example
    collate = CSITCollator(SUMMARY, PAD, max_len=48, pad_to_multiple_of=8, query_from_lm_sample=query_from_lm_sample)
    batch = collate(examples)
    ids, layout = batch.input_ids, batch.layout

    assert batch.group_size == 3
    assert ids.shape[1] % 8 == 0 and ids.shape[1] <= 48
    assert torch.equal(batch.position_ids, layout.position_ids())
    assert all(sum(sum(s) for s in row) <= 48 for row in layout.segments)

    def tokens_at(pos):
        b, p = pos.tolist()
        return ids[b, p].item()

    # every embedding is read at the last summary token, and it ends the expected text
    for i, ex in enumerate(e for e in examples if e.positive is not None):
        b, p = batch.query_positions[i].tolist()
        assert ids[b, p - 2 : p + 1].tolist() == SUMMARY
        assert ids[b, p - 2 - len(ex.session) : p - 2].tolist() == list(ex.session)
        for j, passage in enumerate([ex.positive, *ex.negatives]):
            b, p = batch.passage_positions[i * 3 + j].tolist()
            assert ids[b, p - 2 : p + 1].tolist() == SUMMARY
            assert ids[b, p - 2 - len(passage) : p - 2].tolist() == list(passage)
    # LM samples: [session, summary, response, summary], labels on the response only
    lm_examples = [e for e in examples if e.response is not None]
    spans = [(b, start, seg) for b, start, seg in sample_spans(batch) if seg[2] > 0]
    assert batch.num_lm_samples == len(spans) == len(lm_examples)
    labelled = []
    for b, start, (n, t, r) in spans:
        response = ids[b, start + n + t : start + n + t + r - 3].tolist()
        assert ids[b, start + n : start + n + t].tolist() == SUMMARY
        assert ids[b, start + n + t + r - 3 : start + n + t + r].tolist() == SUMMARY
        assert batch.labels[b, start + n + t : start + n + t + r - 3].tolist() == response
        labelled.append(response)
    assert sorted(labelled) == sorted(list(e.response) for e in lm_examples)
    assert int((batch.labels != -100).sum()) == sum(len(e.response) for e in lm_examples)
    # padding positions hold the pad id
    real = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(layout.segments):
        real[b, : sum(sum(s) for s in row)] = True
    assert (ids[~real] == PAD).all()
    expected_samples = 5 + 3 * 5 + len(lm_examples) - (4 if query_from_lm_sample else 0)
    assert layout.num_samples == expected_samples


def test_collator_truncation_and_errors():
    collate = CSITCollator(SUMMARY, PAD, max_len=16, max_session_len=4, max_passage_len=3, max_response_len=2)
    batch = collate([{"session": list(range(1, 11)), "positive": [50] * 9, "negatives": [], "response": [60] * 9}])
    b, p = batch.query_positions[0].tolist()
    assert batch.input_ids[b, p - 6 : p - 2].tolist() == [7, 8, 9, 10]  # sessions keep their most recent tokens
    assert int((batch.labels != -100).sum()) == 2
    with pytest.raises(ValueError, match="same number"):  # the grouped layout refuses, by option
        CSITCollator(SUMMARY, PAD, max_len=16, negatives="error")([CSITExample([1], [2], [[3]]),
                                                                  CSITExample([1], [2], [])])
    with pytest.raises(ValueError, match="does not fit"):
        CSITCollator(SUMMARY, PAD, max_len=8)([CSITExample(list(range(1, 10)), [2])])
    with pytest.raises(ValueError, match="summary"):
        CSITCollator([], PAD, max_len=8)


def test_pool_hidden_normalizes():
    hidden = torch.randn(2, 5, 8)
    pos = torch.tensor([[1, 4], [0, 2]])
    torch.testing.assert_close(pool_hidden(hidden, pos), torch.stack([hidden[1, 4], hidden[0, 2]]))
    assert torch.allclose(pool_hidden(hidden, pos, normalize=True).norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------- one pass == four forwards


def tiny_lora_model(seed=0):
    import convret.hf  # noqa: F401

    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="convret")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)
    return peft.get_peft_model(model, lora).train()


def padded(seqs):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def reference_four_forward_step(model, examples, alpha, temperature, eps):
    """What the reference implementation does: separate padded forwards for sessions, positives, negatives
    (eager, embeddings at the last summary token) and the LM sequences (eager + dense additive 4-D session mask,
    full-vocabulary logits)."""
    model.set_attn_implementation("eager")

    def embed(seqs):
        ids, mask = padded(seqs)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-1]
        last = mask.sum(1) - 1
        return F.normalize(hidden[torch.arange(len(seqs)), last], dim=-1)

    queries = embed([list(e.session) + SUMMARY for e in examples])
    positives = embed([list(e.positive) + SUMMARY for e in examples])
    negatives = embed([list(n) + SUMMARY for e in examples for n in e.negatives])
    k = len(examples[0].negatives)
    passages = torch.cat([positives.unsqueeze(1), negatives.view(len(examples), k, -1)], 1).flatten(0, 1)
    scores = queries @ passages.t() / temperature
    contrastive = F.cross_entropy(scores, torch.arange(len(examples)) * (k + 1))

    lm = [list(e.session) + SUMMARY + list(e.response) + SUMMARY for e in examples]
    ids, _ = padded(lm)
    layout = SessionLayout.from_segments([[(len(e.session), 3, len(e.response) + 3)] for e in examples], ids.shape[1])
    mask = additive_mask(layout, torch.float32)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        start = len(e.session) + 3
        labels[i, start : start + len(e.response)] = torch.tensor(e.response)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=layout.position_ids(), use_cache=False).logits
    generation = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=eps)
    model.set_attn_implementation("convret")
    return contrastive + alpha * generation, contrastive, generation


@pytest.mark.parametrize("query_from_lm_sample", [False, True])
def test_one_pass_step_equals_reference_four_forwards(query_from_lm_sample):
    from convret.csit import CSITLoss

    model = tiny_lora_model()
    examples = random_examples(random.Random(11), 3, negatives=2)
    batch = CSITCollator(SUMMARY, PAD, max_len=64, query_from_lm_sample=query_from_lm_sample)(examples)
    loss_fn = CSITLoss(alpha=0.2, temperature=0.05, label_smoothing=0.1)

    out = loss_fn(model, batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    ref = reference_four_forward_step(model, examples, alpha=0.2, temperature=0.05, eps=0.1)
    ref[0].backward()
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # norm-wise relative error, as in the attention parity tests
            assert ((grads[name] - p.grad).norm() / p.grad.norm()).item() < 1e-5, name


def test_csit_loss_parts_against_naive_formulas():
    from convret.csit import csit_loss

    g = torch.Generator().manual_seed(0)
    queries, passages = torch.randn(3, 16, generator=g), torch.randn(3 * 4, 16, generator=g)
    hidden, weight = torch.randn(2, 10, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 10), generator=g)
    labels[:, :4] = -100
    out = csit_loss(queries, passages, hidden, weight, labels, alpha=0.3, temperature=0.05, label_smoothing=0.1,
                    group_size=4)
    scores = F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).t() / 0.05
    contrastive = F.cross_entropy(scores, torch.arange(3) * 4)
    generation = F.cross_entropy((hidden[:, :-1] @ weight.t()).flatten(0, 1), labels[:, 1:].flatten(),
                                 label_smoothing=0.1)
    torch.testing.assert_close(out.contrastive, contrastive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.generation, generation, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, contrastive + 0.3 * generation, rtol=1e-5, atol=1e-6)
