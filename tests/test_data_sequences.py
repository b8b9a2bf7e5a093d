"""SequenceFormatter: ChatML / chat template, truncation properties (hypothesis), BOS, passages, examples."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _tiny import word_tokenizer
from convret.data import ASSISTANT, USER, Passage, SequenceFormatter, TrainingExample, Turn

CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")

TOK = word_tokenizer()
WORDS = [f"w{i}" for i in range(60)]


def ids_of(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def chatml_ids(messages) -> list[int]:
    out = []
    for role, text in messages:
        out += ids_of(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    return out


def test_chatml_layout_and_passages_as_assistant_messages():
    fmt = SequenceFormatter(TOK, instruction="tell me about the")
    history = [Turn(USER, "w1 w2"), Turn(ASSISTANT, "w3")]
    got = fmt.session(history, "w4 w5")
    assert got == chatml_ids([("system", "tell me about the"), ("user", "w1 w2"), ("assistant", "w3"),
                              ("user", "w4 w5")])
    assert TOK.convert_ids_to_tokens(got[:2]) == ["<|im_start|>", "system"]
    assert fmt.passage(Passage("p1", "w7 w8", title="w9")) == chatml_ids([("assistant", "w9\nw7 w8")])
    assert fmt.response("w10") == chatml_ids([("assistant", "w10")])
    with_instr = SequenceFormatter(TOK, passage_instruction="about")
    # the passage instruction is the user message the passage answers
    assert with_instr.passage("w7") == chatml_ids([("user", "about"), ("assistant", "w7")])


def test_chat_template_path_equals_chatml_for_a_chatml_template():
    templated = word_tokenizer()
    templated.chat_template = CHATML_TEMPLATE
    history = [Turn(USER, "w1 w2 w3"), Turn(ASSISTANT, "w4"), Turn(USER, "w5")]
    for budget in (None, 40, 25, 12):
        a = SequenceFormatter(templated, max_session_len=budget, instruction="me")
        b = SequenceFormatter(TOK, max_session_len=budget, instruction="me")
        assert a.uses_chat_template and not b.uses_chat_template
        assert a.session(history, "w6 w7") == b.session(history, "w6 w7")
        assert a.passage("w8 w9") == b.passage("w8 w9")


def _bos_tokenizer():
    from tokenizers import processors

    tok = word_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok, bos


def test_bos_follows_the_tokenizer():
    tok, bos = _bos_tokenizer()
    assert tok("w1").input_ids[0] == bos  # the tokenizer itself prepends BOS
    fmt = SequenceFormatter(tok, max_session_len=12)
    session = fmt.session([Turn(USER, "w1 w2 w3 w4"), Turn(ASSISTANT, "w5 w6")], "w7")
    assert session[0] == bos and session.count(bos) == 1 and len(session) <= 12
    assert fmt.passage("w1")[0] == bos
    assert bos not in fmt.response("w1 w2")
    assert SequenceFormatter(TOK).session([], "w1")[0] != bos  # no BOS where the tokenizer adds none


def test_passage_and_response_keep_their_first_tokens():
    fmt = SequenceFormatter(TOK, max_passage_len=8, max_response_len=7)
    words = " ".join(WORDS[:20])
    passage = fmt.passage(words)
    assert len(passage) == 8 and passage == chatml_ids([("assistant", " ".join(WORDS[:5]))])
    assert fmt.response(words) == chatml_ids([("assistant", " ".join(WORDS[:4]))])
    with pytest.raises(ValueError, match="no room"):
        SequenceFormatter(TOK, max_passage_len=3).passage("w1")  # the wrapper alone fills the budget
    with pytest.raises(ValueError, match="empty"):
        fmt.passage("  ")


def test_example_carries_passage_ids_and_every_part():
    fmt = SequenceFormatter(TOK, max_session_len=64)
    ex = TrainingExample("c_2", [Turn(USER, "w1"), Turn(ASSISTANT, "w2")], "w3", Passage("p7", "w4 w5"),
                         [Passage("p8", "w6"), Passage("p9", "w7")], "w8", None)
    out = fmt.example(ex)
    assert out.passage_ids == ["p7", "p8", "p9"]
    assert out.session == fmt.session(ex.history, ex.query) and out.positive == fmt.passage("w4 w5")
    assert out.negatives == [fmt.passage("w6"), fmt.passage("w7")] and out.response == fmt.response("w8")
    lm_only = fmt.example(TrainingExample("c_1", [], "w1", None, [], "w2"))
    assert lm_only.positive is None and lm_only.passage_ids is None and lm_only.response is not None


turn_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


def alternating(turns, query):
    """Oracle of the history's normalisation: leading assistant turns dropped, runs of one role merged, the user
    run before the query kept apart (its turns are dropped one by one before the query is cut)."""
    from itertools import groupby

    while turns and turns[0].role == ASSISTANT:
        turns = turns[1:]
    runs = [(role, [t.text for t in group]) for role, group in groupby(turns, key=lambda t: t.role)]
    pending = runs.pop()[1] if runs and runs[-1][0] == USER else []
    exchanges = [("\n".join(runs[i][1]), "\n".join(runs[i + 1][1])) for i in range(0, len(runs), 2)]
    return exchanges, pending


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.tuples(st.sampled_from([USER, ASSISTANT]), turn_text), max_size=7),
    query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(" ".join),
    instruction=st.one_of(st.none(), turn_text),
    budget=st.integers(8, 70),
)
def test_truncation_properties(history, query, instruction, budget):
    fmt = SequenceFormatter(TOK, max_session_len=budget, instruction=instruction)
    turns = [Turn(role, text) for role, text in history]
    prefix = [("system", instruction)] if instruction else []
    prefix_ids = chatml_ids(prefix)
    one_word = chatml_ids(prefix + [("user", query.split()[-1])])
    if len(one_word) > budget:  # no room beside the instruction: a clear error, never a cut instruction
        with pytest.raises(ValueError, match="instruction"):
            fmt.session(turns, query)
        return
    got = fmt.session(turns, query)
    assert len(got) <= budget  # fits the budget
    assert got[: len(prefix_ids)] == prefix_ids  # the instruction is intact, first
    assert TOK.convert_ids_to_tokens(got[len(prefix_ids): len(prefix_ids) + 2]) == ["<|im_start|>", "user"]
    exchanges, pending = alternating(turns, query)
    full_query = chatml_ids([("user", query)])
    if len(prefix_ids) + len(full_query) <= budget:
        assert got[len(got) - len(ids_of(query)) - 1:] == ids_of(query) + ids_of("<|im_end|>")[:1] + ids_of("\n")
        # the kept exchanges are the most recent ones, and as many as fit: whole exchanges, oldest first, then the
        # user turns merged in front of the query, oldest first
        candidates = [[m for u, a in exchanges[k:] for m in (("user", u), ("assistant", a))]
                      + [("user", "\n".join(pending + [query]))] for k in range(len(exchanges) + 1)]
        candidates += [[("user", "\n".join(pending[j:] + [query]))] for j in range(1, len(pending) + 1)]
        expected = next(c for c in candidates if len(chatml_ids(prefix + c)) <= budget)
        assert got == chatml_ids(prefix + expected)
    else:  # no turn left; the query's front was cut: what remains is its longest suffix that fits
        words = query.split()
        kept = max(k for k in range(len(words) + 1)
                   if len(chatml_ids(prefix + [("user", " ".join(words[len(words) - k:]))])) <= budget)
        assert 0 < kept < len(words)
        assert got == chatml_ids(prefix + [("user", " ".join(words[len(words) - kept:]))])


def test_unknown_role_and_empty_query_are_errors():
    fmt = SequenceFormatter(TOK)
    with pytest.raises(ValueError, match="role"):
        fmt.session([Turn("system", "w1")], "w2")
    with pytest.raises(ValueError, match="empty query"):
        fmt.session([], " ")
