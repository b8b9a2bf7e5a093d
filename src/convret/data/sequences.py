"""Token sequences of sessions, passages and responses, rendered through the model's own chat template.

Sessions, passages and responses are built so that *any* chat template renders them without error and none of
them inherits what a template injects on its own (a default system prompt, a knowledge-date block):

- **Conversation.** The tokenizer's chat template when it has one, ChatML otherwise
  (``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per message, BOS exactly when the tokenizer's ``__call__``
  prepends one). Rendered text is tokenised with ``add_special_tokens=False``: BOS appears once, where the
  template writes it.
- **Session** = the template's rendering of the whole conversation ``[system: instruction]? + exchanges +
  [user: query]`` (whatever the template writes at the start of a conversation stays: it is the model's own
  conversation format). The history is first made to alternate, as strict templates (Mistral) require: a
  leading assistant turn (before any user turn) is dropped; consecutive turns of one role are merged into one
  message, their texts joined by ``"\\n"``; user turns right before the query are merged in front of it.
- **Truncation** (``max_session_len``) drops whole exchanges (a user message and its assistant answer), oldest
  first, as few as needed, so that a session always starts with a user message and ends with the current
  query; then, if still too long, the older user turns merged in front of the query, oldest first; only when
  the instruction and the query alone are too long is the query cut, from the front (its end, the most
  specific part of a question, survives). The instruction is never cut.
- **Assistant message** of a text: what the template appends to ``[user: probe]`` when an assistant message
  with that text follows, i.e. the token difference ``render([user, assistant(text)]) - render([user])``
  (header / markers, the text, the end-of-turn token; never a BOS nor a system block). It is computed once,
  from probe texts, as ``prefix + tokens(text) + suffix``, and checked against the template's in-context
  rendering of a second probe; a template for which that does not hold is rendered in context for every text.
- **Passage** = the conversation's BOS (when the template starts conversations with one) + the assistant
  message of ``title\\ntext`` (or ``text``). With ``passage_instruction``, a passage is instead the whole
  conversation ``[user: passage_instruction, assistant: passage]`` as the template renders it.
- **Response** = the assistant message of the text alone: in the LM sequence it continues the session after the
  summary tokens, exactly as the template would continue the conversation.
- Passages and responses keep their first tokens (their text is stripped first, as templates that trim do).
- No summary tokens here: :class:`convret.CSITCollator` appends them.

docs/data.md shows, per model family, what these sequences look like as tokens.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .records import ASSISTANT, USER, CSITExample, Passage, TrainingExample, Turn

__all__ = ["SequenceFormatter", "chatml"]

_JOIN = "\n"  # between merged turns of one role
TRAINING_MEMO_SIZE = 1 << 17  # formatted texts a training run keeps (~100 tokens each: tens of MB at most)


def chatml(messages: Sequence[dict[str, str]]) -> str:
    """ChatML text of ``[{"role", "content"}]`` messages (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


class SequenceFormatter:
    """Session, passage and response token ids for a tokenizer (the rules: this module's docstring).

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_session_len: token budget of a session (instruction + kept exchanges + query), ``None``: no limit.
        max_passage_len: token budget of a passage (BOS or passage instruction + the passage message).
        max_response_len: token budget of a response message.
        instruction: text of a system message in front of every session (never truncated; templates without a
            system role, such as Mistral's, put it where they put system messages).
        passage_instruction: text of a user message in front of every passage (never truncated).
        use_chat_template: ``None`` (default): the tokenizer's chat template when it has one, ChatML otherwise;
            ``False``: always ChatML.
        memo_size: remember the ids of up to this many formatted sessions, passages and responses (training
            formats the same texts every epoch: ``convret train`` passes :data:`TRAINING_MEMO_SIZE`); 0 (default)
            remembers nothing, so that streaming a collection stays within a shard's memory.

    Example::

        fmt = SequenceFormatter(tokenizer, max_session_len=256, max_passage_len=128)
        ex = fmt.example(training_example)   # a CSITExample with passage ids, ready for CSITCollator
    """

    def __init__(self, tokenizer: Any, max_session_len: int | None = 1024, max_passage_len: int | None = 384,
                 max_response_len: int | None = 384, instruction: str | None = None,
                 passage_instruction: str | None = None, use_chat_template: bool | None = None,
                 memo_size: int = 0):
        self.tokenizer = tokenizer
        self.max_session_len = max_session_len
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self.instruction = instruction or None
        self.passage_instruction = passage_instruction or None
        for name, limit in (("max_session_len", max_session_len), ("max_passage_len", max_passage_len),
                            ("max_response_len", max_response_len)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {limit}")
        template = getattr(tokenizer, "chat_template", None)
        self.uses_chat_template = bool(template) and use_chat_template is not False
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self._chatml_bos = False
        if not self.uses_chat_template and self.bos_id is not None:
            with_special = tokenizer("a").input_ids
            without = tokenizer("a", add_special_tokens=False).input_ids
            self._chatml_bos = len(with_special) > len(without) and with_special[0] == self.bos_id
        self._derive_assistant_message()
        # token ids of texts already formatted, for training: a run formats the same passages and sessions every
        # epoch (rendering and tokenising them was a third of a tiny model's CPU step); off by default, since a
        # stream (encoding a collection) sees each text once and must stay within a shard's memory
        self.memo_size = memo_size
        self._memo: dict[tuple, tuple[int, ...]] = {}

    def _memoized(self, key: tuple, build: Callable[[], list[int]]) -> list[int]:
        """``build()``, remembered under ``key`` (up to ``memo_size`` entries, oldest dropped first); a fresh
        list each call, so a caller may extend it."""
        if self.memo_size <= 0:
            return build()
        key = (*key, self.max_session_len, self.max_passage_len, self.max_response_len, self.instruction,
               self.passage_instruction)  # budgets a caller changed after construction count
        ids = self._memo.get(key)
        if ids is None:
            ids = tuple(build())
            if len(self._memo) >= self.memo_size:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = ids
        return list(ids)

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (chat template or ChatML, BOS where the template writes it)."""
        if self.uses_chat_template:
            from jinja2.exceptions import TemplateError

            try:
                text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                          add_generation_prompt=False)
            except TemplateError as error:
                roles = [m["role"] for m in messages]
                raise ValueError(f"the tokenizer's chat template refuses messages with roles {roles}: {error}") \
                    from error
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        ids = list(self.tokenizer(chatml(messages), add_special_tokens=False).input_ids)
        return [self.bos_id, *ids] if self._chatml_bos else ids

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _probe_texts(self) -> tuple[str, str, str]:
        """Three short texts of ordinary vocabulary words (any tokenizer round-trips them)."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        words: list[str] = []
        for i in range(len(self.tokenizer)):
            if i in special:
                continue
            word = self._decode([i]).strip()
            if len(word) >= 2 and word.isalnum() and word not in words and self._tokens(word) == [i]:
                words.append(word)
                if len(words) == 7:
                    break
        if len(words) < 7:
            raise ValueError("the tokenizer's vocabulary has too few plain words to probe its chat template")
        return words[0], " ".join(words[1:4]), " ".join(words[4:7])

    def _derive_assistant_message(self) -> None:
        """``self._start`` (BOS the conversation starts with, or nothing) and ``self._wrap`` (prefix and suffix
        ids of an assistant message around its text's own tokens, ``None`` when the template's rendering cannot
        be written so)."""
        user, text, check = self._probe_texts()
        self._probe_user = [_message(USER, user)]
        self._head = self.render(self._probe_user)
        self._start = [self._head[0]] if self._head and self.bos_id is not None and self._head[0] == self.bos_id \
            else []
        message = self.assistant_message_in_context(text)
        tokens = self._tokens(text)
        self._wrap: tuple[list[int], list[int]] | None = None
        for i in range(len(message) - len(tokens) + 1):
            if message[i: i + len(tokens)] == tokens:
                prefix, suffix = message[:i], message[i + len(tokens):]
                if self.assistant_message_in_context(check) == prefix + self._tokens(check) + suffix:
                    self._wrap = (prefix, suffix)
                break

    def assistant_message_in_context(self, text: str) -> list[int]:
        """The tokens the template appends to ``[user: probe]`` for an assistant message ``text`` (untruncated):
        the reference that :meth:`passage` and :meth:`response` reproduce."""
        full = self.render(self._probe_user + [_message(ASSISTANT, text)])
        if full[: len(self._head)] != self._head:
            raise ValueError("the chat template does not render an assistant message as an addition to the "
                             "conversation before it: its passages and responses cannot be separated from a session")
        return full[len(self._head):]

    def passage_wrapping(self) -> tuple[list[int], list[int]]:
        """``(prefix ids, suffix ids)`` around a passage's own tokens (``tokenizer(text,
        add_special_tokens=False)``): every untruncated passage is ``prefix + tokens + suffix``."""
        if self._wrap is None:
            raise ValueError("this chat template renders an assistant message's text differently from the text "
                             "tokenised alone: a passage cannot be written as prefix + text + suffix")
        front = self.render([_message(USER, self.passage_instruction)]) if self.passage_instruction else self._start
        return front + self._wrap[0], list(self._wrap[1])

    # ------------------------------------------------------------------ sessions
    def exchanges(self, history: Sequence[Turn]) -> tuple[list[tuple[str, str]], list[str]]:
        """The history as alternating exchanges: ``([(user text, assistant text), ...], pending)`` where
        ``pending`` are the user texts merged in front of the query (module docstring)."""
        for t in history:
            if t.role not in (USER, ASSISTANT):
                raise ValueError(f"turn role must be {USER!r} or {ASSISTANT!r}, got {t.role!r}")
        groups: list[tuple[list[str], list[str]]] = []
        for t in history:
            if t.role == USER:
                if not groups or groups[-1][1]:
                    groups.append(([], []))
                groups[-1][0].append(t.text)
            elif groups:  # an assistant turn before any user turn is dropped
                groups[-1][1].append(t.text)
        pending = groups.pop()[0] if groups and not groups[-1][1] else []
        return [(_JOIN.join(u), _JOIN.join(a)) for u, a in groups], pending

    def session_messages(self, history: Sequence[Turn], query: str) -> list[dict[str, str]]:
        """The untruncated messages of a session (alternating, first and last a user message)."""
        exchanges, pending = self.exchanges(history)
        return self._messages(exchanges, pending, query)

    def _messages(self, exchanges: Sequence[tuple[str, str]], pending: Sequence[str],
                  query: str) -> list[dict[str, str]]:
        messages = [_message("system", self.instruction)] if self.instruction else []
        for user, assistant in exchanges:
            messages += [_message(USER, user), _message(ASSISTANT, assistant)]
        return messages + [_message(USER, _JOIN.join([*pending, query]))]

    def session(self, history: Sequence[Turn], query: str) -> list[int]:
        """Token ids of the session ``history + [query]``, truncated to ``max_session_len`` (module docstring).

        Args:
            history: earlier turns, oldest first (any order of roles).
            query: the current user utterance.
        """
        if not query or not query.strip():
            raise ValueError("empty query")
        return self._memoized(("session", tuple((t.role, t.text) for t in history), query),
                              lambda: self._session(history, query))

    def _session(self, history: Sequence[Turn], query: str) -> list[int]:
        exchanges, pending = self.exchanges(history)
        limit = self.max_session_len
        ids = self.render(self._messages(exchanges, pending, query))
        if limit is None or len(ids) <= limit:
            return ids

        def fewest(count: int, build: Callable[[int], list[int]]) -> list[int] | None:
            """``build(k)`` for the smallest k in 1..count that fits (lengths shrink with k), None if none."""
            if count == 0 or len(build(count)) > limit:
                return None
            lo, hi = 1, count
            while lo < hi:
                mid = (lo + hi) // 2
                if len(build(mid)) <= limit:
                    hi = mid
                else:
                    lo = mid + 1
            return build(lo)

        found = fewest(len(exchanges), lambda k: self.render(self._messages(exchanges[k:], pending, query)))
        if found is None:
            found = fewest(len(pending), lambda k: self.render(self._messages([], pending[k:], query)))
        if found is not None:
            return found
        return self._cut_front(lambda text: self.render(self._messages([], [], text)), query, limit,
                               "the instruction alone")

    def _cut_front(self, build: Callable[[str], list[int]], text: str, limit: int, fixed: str) -> list[int]:
        """Keep the longest suffix of ``text``'s tokens whose rendering fits ``limit``."""
        tokens = self._tokens(text)
        lo, hi = 0, len(tokens)  # lo always fits (checked), find the largest kept count
        if len(build("")) > limit:
            raise ValueError(f"{fixed} takes {len(build(''))} tokens: no room within the budget of {limit}")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(self._decode(tokens[len(tokens) - mid:]))) <= limit:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ValueError(f"{fixed} leaves no room for a single token of the text within the budget of {limit}")
        return build(self._decode(tokens[len(tokens) - lo:]))

    # ------------------------------------------------------------------ passages and responses
    def _assistant(self, front: list[int], text: str, limit: int | None, fixed: str) -> list[int]:
        """``front`` + the assistant message of ``text``, the text's first tokens kept within ``limit``."""
        if self._wrap is not None:
            prefix, suffix = self._wrap
            tokens = self._tokens(text)
            fixed_len = len(front) + len(prefix) + len(suffix)
            if limit is not None and fixed_len + len(tokens) > limit:
                if fixed_len >= limit:
                    raise ValueError(f"{fixed} takes {fixed_len} tokens: no room within the budget of {limit}")
                tokens = tokens[: limit - fixed_len]
            return front + prefix + tokens + suffix
        return self._cut_back(lambda t: front + self.assistant_message_in_context(t), text, limit, fixed)

    def _cut_back(self, build: Callable[[str], list[int]], text: str, limit: int | None, fixed: str) -> list[int]:
        ids = build(text)
        if limit is None or len(ids) <= limit:
            return ids
        tokens = self._tokens(text)
        if len(build("")) > limit:
            raise ValueError(f"{fixed} takes {len(build(''))} tokens: no room within the budget of {limit}")
        lo, hi = 0, len(tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(self._decode(tokens[:mid]))) <= limit:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ValueError(f"{fixed} leaves no room for a single token of the text within the budget of {limit}")
        return build(self._decode(tokens[:lo]))

    @staticmethod
    def passage_text(passage: Passage | str) -> str:
        """``title\\ntext`` (or the text), stripped; an empty passage is a ``ValueError``."""
        text = passage if isinstance(passage, str) else (f"{passage.title}\n{passage.text}" if passage.title
                                                           else passage.text)
        if not text.strip():
            raise ValueError("empty passage")
        return text.strip()

    def passage(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage to embed on its own: BOS when the family's conversations start with one, then
        the passage as an assistant message (or ``[user: passage_instruction, assistant: passage]`` as the
        template renders it), its first tokens kept within ``max_passage_len``."""
        text = self.passage_text(passage)
        return self._memoized(("passage", text), lambda: self._passage(text))

    def _passage(self, text: str) -> list[int]:
        if self.passage_instruction:
            front = self.render([_message(USER, self.passage_instruction)])
            return self._assistant(front, text, self.max_passage_len, "the passage instruction alone")
        return self._assistant(self._start, text, self.max_passage_len, "the passage wrapper alone")

    def response(self, text: str) -> list[int]:
        """Token ids of a response: the assistant message alone (no BOS, no system block: in the LM sequence it
        continues the session), its first tokens kept within ``max_response_len``."""
        if not text or not text.strip():
            raise ValueError("empty response")
        return self._memoized(("response", text.strip()),
                              lambda: self._assistant([], text.strip(), self.max_response_len,
                                                      "the response wrapper alone"))

    def session_with_passages(self, history: Sequence[Turn], query: str,
                              passages: Sequence[Passage | str]) -> list[int]:
        """The session followed by each passage as an assistant message answering it (no BOS, no passage
        instruction inside; each within ``max_passage_len``): UniConv's context ``[session, gold passage]`` and
        generation's grounded prompt."""
        ids = self.session(history, query)
        for passage in passages:
            ids += self._assistant([], self.passage_text(passage), self.max_passage_len, "the passage wrapper alone")
        return ids

    # ------------------------------------------------------------------ examples
    def example(self, ex: TrainingExample) -> CSITExample:
        """A :class:`convret.CSITExample` (session, passages, response, passage ids) of a training example."""
        positive = self.passage(ex.positive) if ex.positive is not None else None
        negatives = [self.passage(p) for p in ex.negatives] if ex.positive is not None else []
        ids = [ex.positive.id, *(p.id for p in ex.negatives)] if ex.positive is not None else None
        response = self.response(ex.response) if ex.response else None
        return CSITExample(self.session(ex.history, ex.query), positive, negatives, response, ids)
