"""SequenceFormatter on the model matrix's chat templates (Qwen2.5, Qwen3, Llama-3, Mistral) and the sample world's
ChatML: no template error for any session shape, no injected system prompt in passages or responses, one BOS,
sessions that alternate from a user turn to the current query, responses that continue the session exactly as
the template continues the conversation, and docs/data.md's per-family renderings generated from here.

Oracles: ``tokenizer.apply_chat_template`` called directly on conversations this file builds itself.
"""
from __future__ import annotations

import re
from itertools import groupby
from pathlib import Path

import pytest

from _model_matrix import FAMILIES, NO_SYSTEM_ROLE
from convret.data import ASSISTANT, USER, CSITExample, Passage, SequenceFormatter, TrainingExample, Turn

NAMES = (*FAMILIES, "chatml")
INJECTED = ("You are Qwen", "helpful assistant", "Cutting Knowledge", "Today Date", "system")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "data.md"

SHAPES = {  # history shapes: every one must render under every template, truncated at every budget
    "empty": [],
    "alternating": [(USER, "What is the tallest mountain in Africa?"), (ASSISTANT, "Mount Kilimanjaro in Tanzania."),
                    (USER, "How high is it?"), (ASSISTANT, "It rises about 5895 metres above the sea.")],
    "starts with assistant": [(ASSISTANT, "Hello, how can I help you today?"), (USER, "Tell me about volcanoes."),
                              (ASSISTANT, "A volcano is an opening in the crust of a planet.")],
    "odd, user last": [(USER, "Who wrote the first novel?"), (ASSISTANT, "Many name The Tale of Genji."),
                       (USER, "When was it written?")],
    "runs of one role": [(USER, "I like rivers."), (USER, "Which river is the longest?"),
                         (ASSISTANT, "The Nile is often named."), (ASSISTANT, "Some measure the Amazon longer."),
                         (USER, "Why do they disagree?"), (USER, "Is it the source?")],
    "assistant only": [(ASSISTANT, "Welcome back."), (ASSISTANT, "Ask me anything.")],
}
QUERY = "How long does it take to climb it?"
PASSAGE = Passage("d1", "Kilimanjaro is a dormant volcano in Tanzania with three volcanic cones.", title="Kilimanjaro")
RESPONSE = "Most climbers take five to seven days."


@pytest.fixture(scope="module")
def tokenizers(model_family):
    from transformers import AutoTokenizer

    from convret.data.sample_world import TOKENIZER_DIR

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = TOKENIZER_DIR if name == "chatml" else model_family(name)
            cache[name] = AutoTokenizer.from_pretrained(str(path))
        return cache[name]

    return get


def render(tok, messages) -> list[int]:
    """The oracle: the template applied directly, tokenised without added special tokens."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return tok(text, add_special_tokens=False).input_ids


def msg(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def alternating(turns, query):
    """The normalisation oracle (docs/data.md): leading assistant turns dropped, runs of one role merged, the
    user run before the query merged in front of it (its turns dropped one by one before the query is cut)."""
    while turns and turns[0][0] == ASSISTANT:
        turns = turns[1:]
    runs = [(role, [text for _, text in group]) for role, group in groupby(turns, key=lambda t: t[0])]
    pending = runs.pop()[1] if runs and runs[-1][0] == USER else []
    exchanges = [("\n".join(runs[i][1]), "\n".join(runs[i + 1][1])) for i in range(0, len(runs), 2)]
    return exchanges, pending


def candidates(turns, query, system=None):
    """The sessions truncation may give, in order of preference (the first that fits is the answer)."""
    exchanges, pending = alternating(turns, query)
    front = [msg("system", system)] if system else []
    out = [front + [m for u, a in exchanges[k:] for m in (msg(USER, u), msg(ASSISTANT, a))]
           + [msg(USER, "\n".join(pending + [query]))] for k in range(len(exchanges) + 1)]
    return out + [front + [msg(USER, "\n".join(pending[j:] + [query]))] for j in range(1, len(pending) + 1)]


def writes_bos(tok) -> bool:
    return tok.bos_token_id is not None and render(tok, [msg(USER, "a")])[0] == tok.bos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_sessions_of_every_shape_render_and_truncate_by_exchanges(name, tokenizers):
    tok = tokenizers(name)
    bos = tok.bos_token_id
    for label, history in SHAPES.items():
        turns = [Turn(role, text) for role, text in history]
        for system in (None,) if name in NO_SYSTEM_ROLE else (None, "Answer about mountains."):
            options = [(c, render(tok, c)) for c in candidates(history, QUERY, system)]  # the oracle never raises
            full = options[0][1]
            fmt = SequenceFormatter(tok, max_session_len=None, instruction=system)
            assert fmt.session(turns, QUERY) == full
            smallest = min(len(ids) for _, ids in options)
            for budget in range(len(full), smallest - 1, -1):  # every budget down to the query alone
                fmt.max_session_len = budget
                got = fmt.session(turns, QUERY)
                expected_messages, expected = next((c, ids) for c, ids in options if len(ids) <= budget)
                assert got == expected, (label, system, budget)
                # alternation from a user turn to the current query
                roles = [m["role"] for m in expected_messages if m["role"] != "system"]
                assert roles[0] == USER and roles[-1] == USER and expected_messages[-1]["content"].endswith(QUERY)
                assert all(a != b for a, b in zip(roles, roles[1:]))
                if bos is not None:
                    assert got.count(bos) == (1 if writes_bos(tok) else 0)


@pytest.mark.parametrize("name", NO_SYSTEM_ROLE)
def test_an_instruction_under_a_template_without_a_system_role_is_a_clear_error(name, tokenizers):
    fmt = SequenceFormatter(tokenizers(name), instruction="Answer about mountains.")
    with pytest.raises(ValueError, match=re.escape("chat template refuses messages with roles ['system', 'user']")):
        fmt.session([], QUERY)


@pytest.mark.parametrize("name", NAMES)
def test_a_session_cut_to_its_query_still_renders(name, tokenizers):
    tok = tokenizers(name)
    turns = [Turn(role, text) for role, text in SHAPES["runs of one role"]]
    only_query = len(render(tok, [msg(USER, QUERY)]))
    fmt = SequenceFormatter(tok, max_session_len=only_query - 3)
    got = fmt.session(turns, QUERY)
    assert len(got) <= only_query - 3
    text = tok.decode(got)
    assert "climb it" in text and "Nile" not in text and "rivers" not in text  # the query's end survives alone


@pytest.mark.parametrize("name", NAMES)
def test_passages_and_responses_carry_no_system_prompt_and_one_bos_at_most(name, tokenizers):
    tok = tokenizers(name)
    fmt = SequenceFormatter(tok, max_session_len=None, max_passage_len=None, max_response_len=None)
    probe = [msg(USER, "Where is it?")]
    head = render(tok, probe)
    text = f"{PASSAGE.title}\n{PASSAGE.text}"
    in_context = render(tok, probe + [msg(ASSISTANT, text)])
    assert in_context[: len(head)] == head
    start = [tok.bos_token_id] if writes_bos(tok) else []
    passage, response = fmt.passage(PASSAGE), fmt.response(RESPONSE)
    for ids in (passage, response):
        decoded = tok.decode(ids, skip_special_tokens=False)
        assert not any(marker in decoded for marker in INJECTED), decoded
    assert passage == start + in_context[len(head):]  # BOS + the assistant message as the template writes it
    if tok.bos_token_id is not None:
        assert passage.count(tok.bos_token_id) == len(start) and tok.bos_token_id not in response
    # the LM sequence continues the session exactly as the template continues the conversation
    for label, history in SHAPES.items():
        turns = [Turn(role, t) for role, t in history]
        conversation = candidates(history, QUERY)[0]
        assert fmt.session(turns, QUERY) + response == render(tok, conversation + [msg(ASSISTANT, RESPONSE)]), label
    # the assistant message is prefix + the text's own tokens + suffix (what the sentence-transformers export uses)
    from convret.retrieval.export import passage_wrapping

    prefix, suffix = fmt.passage_wrapping()
    assert passage == prefix + tok(text, add_special_tokens=False).input_ids + suffix
    assert passage_wrapping(tok, fmt) == (prefix, suffix)


@pytest.mark.parametrize("name", NAMES)
def test_passage_instruction_is_a_user_message_the_passage_answers(name, tokenizers):
    tok = tokenizers(name)
    fmt = SequenceFormatter(tok, max_passage_len=None, passage_instruction="Represent this passage.")
    assert fmt.passage("A passage about rivers.") == render(
        tok, [msg(USER, "Represent this passage."), msg(ASSISTANT, "A passage about rivers.")])


@pytest.mark.parametrize("name", NAMES)
def test_truncated_passages_and_responses_keep_their_first_tokens(name, tokenizers):
    tok = tokenizers(name)
    text = f"{PASSAGE.title}\n{PASSAGE.text}"
    tokens = tok(text, add_special_tokens=False).input_ids
    prefix, suffix = SequenceFormatter(tok).passage_wrapping()
    response_prefix = prefix[1:] if writes_bos(tok) else prefix
    for budget in range(len(prefix) + len(suffix) + 1, len(prefix) + len(tokens) + len(suffix) + 2):
        fmt = SequenceFormatter(tok, max_passage_len=budget, max_response_len=budget)
        kept = min(len(tokens), budget - len(prefix) - len(suffix))
        assert fmt.passage(PASSAGE) == prefix + tokens[:kept] + suffix
        kept = min(len(tokens), budget - len(response_prefix) - len(suffix))
        assert fmt.response(text) == response_prefix + tokens[:kept] + suffix
    with pytest.raises(ValueError, match="no room"):
        SequenceFormatter(tok, max_passage_len=len(prefix) + len(suffix)).passage(PASSAGE)


class _Recorder:
    """Stands in for CSITCollator: keeps the sequences TrainingCollator builds."""

    def __call__(self, sequences):
        self.sequences = sequences

        class _Batch:
            stats: dict = {}

        return _Batch()


@pytest.mark.parametrize("name", NAMES)
def test_no_doubled_bos_in_training_and_uniconv_sequences(name, tokenizers):
    from convret.train.data import TrainingCollator

    tok = tokenizers(name)
    fmt = SequenceFormatter(tok, max_session_len=None, max_passage_len=128, max_response_len=None)
    history = [Turn(role, text) for role, text in SHAPES["starts with assistant"]]
    example = TrainingExample("c_1", history, QUERY, PASSAGE, [Passage("d2", "Mount Kenya is in Kenya.")], RESPONSE)
    recorder = _Recorder()
    TrainingCollator(fmt, recorder, recipe="uniconv")([example])
    csit, cii = recorder.sequences
    assert isinstance(cii, CSITExample)
    bos = tok.bos_token_id
    one = 1 if writes_bos(tok) else 0
    sequences = [csit.session, csit.positive, *csit.negatives, cii.session, cii.positive]
    if bos is not None:
        assert [s.count(bos) for s in sequences] == [one] * len(sequences)
        assert all(s[0] == bos for s in sequences) if one else True
        assert csit.response.count(bos) == 0
    # the CII context is the session continued by the gold passage as an assistant message (the template's own)
    conversation = candidates(SHAPES["starts with assistant"], QUERY)[0]
    assert cii.session == render(tok, conversation + [msg(ASSISTANT, f"{PASSAGE.title}\n{PASSAGE.text}")])


def family_renderings(tokenizers) -> str:
    """docs/data.md's per-family block: each sequence decoded with its special tokens, and its length."""
    out = []
    history = [Turn(USER, "What is the tallest mountain in Africa?"), Turn(ASSISTANT, "Mount Kilimanjaro.")]
    for name in (n for n in NAMES if n != "llama3-tied"):  # llama3-tied has llama3's tokenizer
        tok = tokenizers(name)
        fmt = SequenceFormatter(tok)
        out.append(f"{name}")
        for label, ids in (("session", fmt.session(history, QUERY)),
                           ("passage", fmt.passage(Passage("d1", "Kilimanjaro is a dormant volcano in Tanzania."))),
                           ("response", fmt.response(RESPONSE))):
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"  {label:<8} {len(ids):>2} tokens  {text.encode('unicode_escape').decode()}")
    return "\n".join(out)


def test_docs_show_the_renderings_of_every_family(tokenizers):
    block = re.search(r"<!-- families:begin -->\n```\n(.*?)\n```\n<!-- families:end -->", DOCS.read_text(), re.S)
    assert block, "docs/data.md lacks the families block"
    assert block.group(1) == family_renderings(tokenizers), (
        "docs/data.md's per-family renderings are stale; the current ones:\n" + family_renderings(tokenizers))


@pytest.mark.parametrize("name", NAMES)
def test_the_sample_worlds_training_and_eval_files_format_under_every_template(name, tokenizers):
    """Every record of the sample world's triplet file and evaluation file, at the bundled configs' budgets."""
    from itertools import islice

    from convret.data import read_conversations, read_training
    from convret.data.sample_world import EVAL, SAMPLE_WORLD_DIR, TRAIN_TRIPLETS
    from convret.train.data import TrainingCollator

    tok = tokenizers(name)
    fmt = SequenceFormatter(tok, max_session_len=64, max_passage_len=48, max_response_len=32,
                            instruction=None if name in NO_SYSTEM_ROLE else "Find the passage.")
    recorder = _Recorder()
    examples = list(islice(read_training(SAMPLE_WORLD_DIR / TRAIN_TRIPLETS, strict=True), 64))
    TrainingCollator(fmt, recorder, recipe="uniconv")(examples)
    assert len(recorder.sequences) > len(examples)
    for turn in islice(read_conversations(SAMPLE_WORLD_DIR / EVAL, strict=True), 64):
        assert len(fmt.session(turn.history, turn.query)) <= 64


def test_formatting_a_text_again_gives_the_same_ids_as_a_fresh_formatter(tokenizers):
    """Sessions, passages and responses are remembered per formatter (a training run formats them every
    epoch): a second call equals what a fresh formatter computes, returns a list of its own, and follows a
    budget changed after construction."""
    tok = tokenizers("chatml")
    fmt = SequenceFormatter(tok, max_session_len=40, max_passage_len=12, max_response_len=8, memo_size=2)
    history = [Turn(role, text) for role, text in SHAPES[next(iter(SHAPES))]]
    for _ in range(2):
        fresh = SequenceFormatter(tok, max_session_len=40, max_passage_len=12, max_response_len=8)
        assert fmt.session(history, QUERY) == fresh.session(history, QUERY)
        assert fmt.passage(PASSAGE) == fresh.passage(PASSAGE)
        assert fmt.response(RESPONSE) == fresh.response(RESPONSE)
    ids = fmt.passage(PASSAGE)
    ids.append(-1)
    assert fmt.passage(PASSAGE)[-1] != -1
    fmt.max_passage_len = 6
    assert fmt.passage(PASSAGE) == SequenceFormatter(tok, max_passage_len=6).passage(PASSAGE)
    assert len(fmt.passage(PASSAGE)) == 6
    assert len(fmt._memo) == 2  # bounded: the oldest entries went
    plain = SequenceFormatter(tok)
    plain.passage(PASSAGE)
    assert not plain._memo  # off by default: a stream (encode) keeps nothing (tests/test_retrieval_scale.py)
