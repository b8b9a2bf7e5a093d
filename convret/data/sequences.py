"""Token sequences of sessions, passages and responses, the way ChatRetriever formats them.

- A session is rendered with the tokenizer's chat template when it has one, ChatML otherwise
  (``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per message); the optional instruction is a system message in
  front. Passages and responses are assistant messages (with ``passage_instruction`` as a system message in
  front of passages).
- Truncation (``max_session_len``) never cuts the instruction, keeps the current query and drops whole turns,
  oldest first; only when the instruction and the current query alone are too long is the query cut, from the
  front (its end, the most specific part of a question, survives). Passages and responses keep their first
  tokens.
- BOS follows the tokenizer: a chat template that writes ``bos_token`` gets it once; without a template, a
  BOS is prepended exactly when the tokenizer's own ``__call__`` prepends one. Responses never start with BOS
  (they continue the session in the LM sequence).
- No summary tokens here: :class:`convret.CSITCollator` appends them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .records import ASSISTANT, USER, CSITExample, Passage, TrainingExample, Turn

__all__ = ["SequenceFormatter", "chatml"]


def chatml(messages: Sequence[dict[str, str]]) -> str:
    """ChatML text of ``[{"role", "content"}]`` messages (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


class SequenceFormatter:
    """Session, passage and response token ids for a tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_session_len: token budget of a session (instruction + kept turns + query), ``None``: no limit.
        max_passage_len: token budget of a passage (passage instruction + the passage message).
        max_response_len: token budget of a response message.
        instruction: text of a system message in front of every session (never truncated).
        passage_instruction: text of a system message in front of every passage (never truncated).
        use_chat_template: ``None`` (default): the tokenizer's chat template when it has one, ChatML otherwise;
            ``False``: always ChatML.

    Example::

        fmt = SequenceFormatter(tokenizer, max_session_len=256, max_passage_len=128)
        ex = fmt.example(training_example)   # a CSITExample with passage ids, ready for CSITCollator
    """

    def __init__(self, tokenizer: Any, max_session_len: int | None = 1024, max_passage_len: int | None = 384,
                 max_response_len: int | None = 384, instruction: str | None = None,
                 passage_instruction: str | None = None, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.max_session_len = max_session_len
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self.instruction = instruction or None
        self.passage_instruction = passage_instruction or None
        template = getattr(tokenizer, "chat_template", None)
        self.uses_chat_template = bool(template) and use_chat_template is not False
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self._chatml_bos = False
        if not self.uses_chat_template and self.bos_id is not None:
            with_special = tokenizer("a").input_ids
            without = tokenizer("a", add_special_tokens=False).input_ids
            self._chatml_bos = len(with_special) > len(without) and with_special[0] == self.bos_id
        for name, limit in (("max_session_len", max_session_len), ("max_passage_len", max_passage_len),
                            ("max_response_len", max_response_len)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {limit}")

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (chat template or ChatML, BOS per tokenizer)."""
        if self.uses_chat_template:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        ids = list(self.tokenizer(chatml(messages), add_special_tokens=False).input_ids)
        return [self.bos_id, *ids] if self._chatml_bos else ids

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ sessions
    def session_messages(self, history: Sequence[Turn], query: str) -> list[dict[str, str]]:
        """The untruncated messages of a session."""
        messages = [{"role": "system", "content": self.instruction}] if self.instruction else []
        for turn in history:
            if turn.role not in (USER, ASSISTANT):
                raise ValueError(f"turn role must be {USER!r} or {ASSISTANT!r}, got {turn.role!r}")
            messages.append({"role": turn.role, "content": turn.text})
        messages.append({"role": USER, "content": query})
        return messages

    def session(self, history: Sequence[Turn], query: str) -> list[int]:
        """Token ids of the session ``history + [query]``, truncated to ``max_session_len`` (module docstring).

        Args:
            history: earlier turns, oldest first.
            query: the current user utterance.
        """
        if not query or not query.strip():
            raise ValueError("empty query")
        prefix = [{"role": "system", "content": self.instruction}] if self.instruction else []
        turns = [{"role": t.role, "content": t.text} for t in history]
        for t in history:
            if t.role not in (USER, ASSISTANT):
                raise ValueError(f"turn role must be {USER!r} or {ASSISTANT!r}, got {t.role!r}")
        current = {"role": USER, "content": query}
        limit = self.max_session_len

        def build(dropped: int) -> list[int]:
            return self.render(prefix + turns[dropped:] + [current])

        ids = build(0)
        if limit is None or len(ids) <= limit:
            return ids
        # the fewest oldest turns to drop (length shrinks as turns go: binary search)
        lo, hi = 1, len(turns)
        if len(build(hi)) <= limit:
            while lo < hi:
                mid = (lo + hi) // 2
                if len(build(mid)) <= limit:
                    hi = mid
                else:
                    lo = mid + 1
            return build(lo)
        return self._cut_front(lambda text: self.render(prefix + [{"role": USER, "content": text}]), query, limit,
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

    # ------------------------------------------------------------------ passages and responses
    def passage(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage as an assistant message (``title\\ntext`` when it has a title), its first
        tokens kept within ``max_passage_len``."""
        text = passage if isinstance(passage, str) else (f"{passage.title}\n{passage.text}" if passage.title
                                                           else passage.text)
        if not text.strip():
            raise ValueError("empty passage")
        prefix = [{"role": "system", "content": self.passage_instruction}] if self.passage_instruction else []
        return self._cut_back(lambda t: self._assistant(prefix, t), text, self.max_passage_len,
                              "the passage instruction alone")

    def response(self, text: str) -> list[int]:
        """Token ids of a response as an assistant message, without BOS (it continues the session in the LM
        sequence), its first tokens kept within ``max_response_len``."""
        if not text or not text.strip():
            raise ValueError("empty response")

        def build(t: str) -> list[int]:
            ids = self._assistant([], t)
            return ids[1:] if ids and self.bos_id is not None and ids[0] == self.bos_id else ids

        return self._cut_back(build, text, self.max_response_len, "the response wrapper alone")

    def _assistant(self, prefix: list[dict[str, str]], text: str) -> list[int]:
        return self.render(prefix + [{"role": ASSISTANT, "content": text}])

    # ------------------------------------------------------------------ examples
    def example(self, ex: TrainingExample) -> CSITExample:
        """A :class:`convret.CSITExample` (session, passages, response, passage ids) of a training example."""
        positive = self.passage(ex.positive) if ex.positive is not None else None
        negatives = [self.passage(p) for p in ex.negatives] if ex.positive is not None else []
        ids = [ex.positive.id, *(p.id for p in ex.negatives)] if ex.positive is not None else None
        response = self.response(ex.response) if ex.response else None
        return CSITExample(self.session(ex.history, ex.query), positive, negatives, response, ids)
