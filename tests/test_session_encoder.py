"""SessionEncoder: incremental session encoding equals a full encode (``Encoder.encode_sessions``, the path of
``convret encode``) in fp32 within 1e-5, for growing sessions, edited sessions and truncated sessions, on the
tiny Qwen2 retriever and on every family of the model matrix, with and without ``chatretriever_compat`` (whose
summary block starts with the separator); the cache stays within its byte budget; the LRU order is observable.
The cached prefill runs on the backend "auto" picks (the native CPU kernel when built); the growing-session and
mixed-batch tests run on both CPU backends of it, ``cpu`` and ``sdpa``, forced through
``$CONVRET_BACKEND_CACHED_SESSION_ATTENTION``."""
import random

import numpy as np
import pytest
import torch

from convret.data.records import Turn
from convret.ops.session_attention import cached as cached_op
from convret.ops.session_attention.cpu import native_available
from convret.retrieval.encoder import Encoder
from convret.retrieval.session_encoder import SessionEncoder, turns_of
from _model_matrix import FAMILIES
from _retrieval_fixtures import WORDS, tiny_checkpoint

TOL = 1e-5


def text(rng, lo=3, hi=20, words=WORDS):
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def full(encoder, turns):
    return encoder.encode_sessions([(turns[:-1], turns[-1].text)])[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Encoder.from_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("se") / "ck"))


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.skipif(not native_available(),
                                                                     reason="native extension not built")),
                        "sdpa"])
def cached_backend(request, monkeypatch):
    """Forces the cached prefill's backend; afterwards checks that the native kernel ran (cpu) or did not (sdpa)."""
    monkeypatch.setenv("CONVRET_BACKEND_CACHED_SESSION_ATTENTION", request.param)
    calls = []
    native = cached_op.cached_session_attention_native
    monkeypatch.setattr(cached_op, "cached_session_attention_native",
                        lambda *args, **kwargs: calls.append(1) or native(*args, **kwargs))
    yield request.param
    assert bool(calls) == (request.param == "cpu"), (request.param, len(calls))


def grow_and_check(encoder, se, rng, conv="c", turns_n=8, words=WORDS):
    turns, infos = [], []
    for _ in range(turns_n):
        turns.append(Turn("user", text(rng, words=words)))
        vec, info = se.encode(conv, turns)
        np.testing.assert_allclose(vec, full(encoder, turns), atol=TOL, rtol=0)
        assert info.reused_tokens + info.computed_tokens == info.total_tokens
        infos.append(info)
        turns.append(Turn("assistant", text(rng, words=words)))
    return turns, infos


def test_growing_session_reuses_the_prefix_and_truncation_recomputes(tiny, cached_backend):
    se = SessionEncoder(tiny, cache_mb=4)
    turns, infos = grow_and_check(tiny, se, random.Random(0), turns_n=8)
    assert infos[0].cache == "miss" and infos[0].reused_tokens == 0
    hits = [i for i in infos if i.cache == "hit"]
    assert hits and all(i.reused_tokens > 0 for i in hits)
    # the fixture's max_session_len is 200: the oldest turns are dropped, the prefix changes
    changed = [i for i in infos if i.cache == "changed"]
    assert changed, [i.total_tokens for i in infos]
    stats = se.cache_info()
    assert stats["prefix_changes"] == len(changed) and stats["hits"] == len(hits) and stats["misses"] == 1
    # a hit computes only the new turns + summary tokens: far fewer than the whole session
    assert sum(i.computed_tokens for i in hits) < sum(i.total_tokens for i in hits) / 2


def test_edited_turn_reuses_the_common_prefix(tiny):
    rng = random.Random(1)
    se = SessionEncoder(tiny, cache_mb=4)
    turns, _ = grow_and_check(tiny, se, rng, turns_n=3)
    edited = list(turns[:-1])
    edited[2] = Turn("user", text(rng))  # the second user turn changes
    vec, info = se.encode("c", edited)
    np.testing.assert_allclose(vec, full(tiny, edited), atol=TOL, rtol=0)
    prefix = len(tiny.session_tokens(edited[:1], edited[1].text)) - len(tiny.config.summary_token_ids)
    assert info.cache == "changed" and 0 < info.reused_tokens <= prefix + 5
    # the same session again: everything but the summary tokens is reused
    vec2, info2 = se.encode("c", edited)
    np.testing.assert_allclose(vec2, vec, atol=TOL, rtol=0)
    assert info2.cache == "hit" and info2.computed_tokens == len(tiny.config.summary_token_ids)


def test_batch_of_mixed_requests_is_one_forward(tiny, cached_backend):
    rng = random.Random(2)
    se = SessionEncoder(tiny, cache_mb=4, token_budget=150)
    sessions = {f"c{i}": [Turn("user", text(rng))] for i in range(5)}
    for cid, turns in sessions.items():
        se.encode(cid, turns)
    for turns in sessions.values():
        turns += [Turn("assistant", text(rng)), Turn("user", text(rng))]
    requests = [se.session_request(cid, turns) for cid, turns in sessions.items()]
    requests.append(se.session_request("new", [Turn("user", text(rng))]))
    requests.append(se.session_request(None, [Turn("user", text(rng)), Turn("assistant", "w1"),
                                              Turn("user", "w2")]))
    passages = ["w1 w2 w3", text(rng, 20, 40)]
    requests += [se.passage_request(p) for p in passages]
    forwards = se.stats.forwards
    vectors, infos = se.encode_requests(requests)
    assert se.stats.forwards == forwards + 1
    for i, turns in enumerate(sessions.values()):
        np.testing.assert_allclose(vectors[i], full(tiny, turns), atol=TOL, rtol=0)
        assert infos[i].cache == "hit"
    assert [i.cache for i in infos[5:]] == ["miss", "none", "none", "none"]
    np.testing.assert_allclose(vectors[-2:], tiny.encode_passages(passages), atol=TOL, rtol=0)


def test_cache_budget_lru_eviction(tiny):
    rng = random.Random(3)
    se = SessionEncoder(tiny, cache_mb=0.03)  # ~31 kB: a handful of short sessions
    budget = se.stats.budget_bytes
    convs = {f"c{i}": [Turn("user", text(rng))] for i in range(8)}
    for _ in range(2):
        for cid, turns in convs.items():
            vec, info = se.encode(cid, turns)
            np.testing.assert_allclose(vec, full(tiny, turns), atol=TOL, rtol=0)
            assert se.cache_info()["bytes"] <= budget
            turns += [Turn("assistant", text(rng, 1, 3)), Turn("user", text(rng, 1, 3))]
    stats = se.cache_info()
    assert stats["evictions"] > 0 and stats["max_bytes_seen"] <= budget
    assert stats["misses"] > 8  # evicted conversations were recomputed
    # no cache at all: always a miss, always exact
    off = SessionEncoder(tiny, cache_mb=0)
    turns = convs["c0"]
    vec, info = off.encode("c0", turns)
    vec, info = off.encode("c0", turns)
    assert info.cache == "miss" and off.cache_info()["bytes"] == 0
    np.testing.assert_allclose(vec, full(tiny, turns), atol=TOL, rtol=0)


def lru_violations(se) -> list[str]:
    """Runs an eviction scenario on an empty ``se`` and returns what contradicts least-recently-used order.

    Four equal-sized sessions (5 tokens each plus the template); the budget holds three. a, b, c are cached, a is
    asked again (the most recent now), d arrives: b, the least recently used, must go. Then c is asked again and
    e arrives: a must go. Which conversations are cached is read with ``cached_tokens`` and with the next
    request's ``cache`` status (a hit or a miss)."""
    sessions = {cid: [Turn("user", " ".join(f"w{10 * i + j}" for j in range(5)))] for i, cid in enumerate("abcde")}
    se.encode("a", sessions["a"])
    entry = se.cache_info()["bytes"]
    se.stats.budget_bytes = int(3.5 * entry)
    problems = []

    def expect(cached: str, gone: str, when: str) -> None:
        held = {cid for cid in "abcde" if se.cached_tokens(cid)}
        if held != set(cached):
            problems.append(f"{when}: cached {sorted(held)}, expected {sorted(cached)}")
        for cid in gone:
            if se.cached_tokens(cid):
                problems.append(f"{when}: {cid} should have been evicted")

    for cid in "bc":
        se.encode(cid, sessions[cid])
    expect("abc", "", "after a, b, c")
    se.encode("a", sessions["a"])  # a: the most recently used
    se.encode("d", sessions["d"])
    expect("acd", "b", "after a again, then d")
    se.encode("c", sessions["c"])
    se.encode("e", sessions["e"])
    expect("cde", "a", "after c again, then e")
    statuses = {cid: se.encode(cid, sessions[cid])[1].cache for cid in "ed"}
    if statuses != {"e": "hit", "d": "hit"}:
        problems.append(f"the most recent conversations are not hits: {statuses}")
    return problems


def test_cache_evicts_the_least_recently_used_conversation(tiny):
    """The eviction order is observable: the conversation evicted is the least recently *used* one (a request
    refreshes it), never the newest. Mutants prove that this test can fail: a cache that evicts its most recent
    entry, with and without the refresh on use (``move_to_end``; storing the new session re-inserts the entry,
    which refreshes it too)."""
    from collections import OrderedDict

    class EvictsTheNewest(OrderedDict):
        def popitem(self, last=True):
            return super().popitem(last=True)

    class EvictsTheNewestNeverRefreshed(EvictsTheNewest):
        def move_to_end(self, key, last=True):
            pass

    assert lru_violations(SessionEncoder(tiny, cache_mb=1)) == []
    for mutant in (EvictsTheNewest, EvictsTheNewestNeverRefreshed):
        se = SessionEncoder(tiny, cache_mb=1)
        se._cache = mutant()
        assert lru_violations(se), f"the scenario does not notice a cache that {mutant.__name__}"


def test_chatretriever_compat_sessions_equal_convret_encode(tmp_path):
    """A chatretriever_compat checkpoint appends [separator, EMB_1..EMB_t] to every session: the incremental
    encoder, turn by turn under one conversation id (cache hits), gives the vectors `convret encode` writes."""
    from convret.cli import main as cli
    from convret.data import read_conversations
    from convret.retrieval.embeddings import read_embeddings
    from _retrieval_fixtures import write_eval_world
    from _tiny import word_tokenizer

    separator = word_tokenizer().convert_tokens_to_ids("<|im_end|>")
    ck = tiny_checkpoint(tmp_path / "ck", chatretriever_compat=True, separator_token="<|im_end|>",
                         separator_token_id=separator)
    write_eval_world(tmp_path / "w", n_conv=2, turns=3)
    assert cli(["encode", "--model", str(ck), "--conversations", str(tmp_path / "w/eval.json"), "--output",
                str(tmp_path / "q"), "--no-progress"]) == 0
    ids, vectors, _ = read_embeddings(tmp_path / "q")
    want = dict(zip(ids, vectors))
    encoder = Encoder.from_checkpoint(ck)
    se = SessionEncoder(encoder, cache_mb=4)
    infos = []
    for turn in read_conversations(tmp_path / "w/eval.json"):
        turns = [*turn.history, Turn("user", turn.query)]
        request = se.session_request(f"c{turn.conv_id}", turns)
        assert request.tokens[-4:] == [separator, *encoder.config.summary_token_ids]
        vec, info = se.encode(f"c{turn.conv_id}", turns)
        np.testing.assert_allclose(vec, want[turn.qid], atol=TOL, rtol=0)
        infos.append(info)
    assert [i.cache for i in infos] == ["miss", "hit", "hit"] * 2


def test_bad_turns_raise():
    with pytest.raises(ValueError, match="role"):
        turns_of([{"role": "system", "text": "x"}])
    with pytest.raises(ValueError, match="empty"):
        turns_of([{"role": "user", "text": "  "}])
    with pytest.raises(ValueError, match="user"):
        turns_of([{"role": "user", "text": "a"}, {"role": "assistant", "text": "b"}])
    with pytest.raises(ValueError, match="at least one"):
        turns_of([])


def family_checkpoint(model_dir, out_dir, max_session_len, compat=False, **config_overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convret.data.summary_tokens import add_summary_tokens
    from convret.train.checkpoint import RetrieverConfig, save_retriever

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config_overrides)
    summary = add_summary_tokens(model, tokenizer, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # chatretriever_compat: every summary block is [separator, EMB_1..EMB_t], the separator the EOS by default
    separator = dict(chatretriever_compat=True, separator_token=tokenizer.eos_token,
                     separator_token_id=tokenizer.eos_token_id) if compat else {}
    config = RetrieverConfig(summary.tokens, summary.ids, max_session_len=max_session_len, max_passage_len=64,
                             **separator)
    return save_retriever(out_dir, model, tokenizer, config)


FAMILY_WORDS = ["tell", "me", "about", "the", "lighthouse", "color", "and", "what", "harbour", "red", "tall",
                "it", "is", "built", "year", "museum", "bridge", "river", "old", "stone"]


@pytest.mark.parametrize("family,compat", [(f, False) for f in FAMILIES] + [("llama3", True)],
                         ids=[*FAMILIES, "llama3-chatretriever-compat"])
def test_model_matrix_family(family, compat, model_family, tmp_path):
    encoder = Encoder.from_checkpoint(family_checkpoint(model_family(family), tmp_path / "ck", 180, compat))
    assert encoder.config.summary_block()[0] == (encoder.tokenizer.eos_token_id if compat else
                                                 encoder.config.summary_token_ids[0])
    se = SessionEncoder(encoder, cache_mb=8)
    rng = random.Random(4)
    turns, infos = grow_and_check(encoder, se, rng, turns_n=3, words=FAMILY_WORDS)
    assert all(i.cache == "hit" and i.reused_tokens > 0 for i in infos[1:]), infos
    edited = list(turns[:-1])
    edited[-3] = Turn("user", "what about the museum")
    vec, info = se.encode("c", edited)
    np.testing.assert_allclose(vec, full(encoder, edited), atol=TOL, rtol=0)
    assert info.cache == "changed" and info.reused_tokens > 0
    # grow until truncation drops the oldest exchanges
    _, infos = grow_and_check(encoder, se, rng, conv="long", turns_n=8, words=FAMILY_WORDS)
    assert any(i.cache == "changed" for i in infos), "the session never reached max_session_len"


def test_sliding_window_mistral_incremental_equals_full(model_family, tmp_path, cached_backend):
    """Mistral with a sliding window of 16 keys, shorter than the sessions: the cached prefill's window (native
    kernel and SDPA loop) gives the full encode's vectors, whose window is session attention's."""
    encoder = Encoder.from_checkpoint(family_checkpoint(model_family("mistral"), tmp_path / "ck", 180,
                                                        sliding_window=16))
    assert encoder.model.config.sliding_window == 16
    se = SessionEncoder(encoder, cache_mb=8)
    turns, infos = grow_and_check(encoder, se, random.Random(5), turns_n=3, words=FAMILY_WORDS)
    assert infos[-1].total_tokens > 16 and all(i.cache == "hit" for i in infos[1:]), infos
