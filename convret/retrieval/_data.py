"""The data layer as retrieval sees it: readers, ``write_run`` and the sequence formatter of ``convret.data``.

Every retrieval command formats text exactly as training did: :func:`formatter_for` builds
``convret.data.SequenceFormatter`` from the checkpoint's :class:`RetrieverConfig` fields.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

from ..data.records import EvalTurn, Passage, Turn

__all__ = ["formatter_for", "iter_collection", "iter_conversations", "load_qrels", "load_run", "save_run",
           "passage_ids", "session_ids"]


def formatter_for(tokenizer: Any, config: Any) -> Any:
    """The training-time formatter for ``config`` (a :class:`RetrieverConfig`)."""
    try:
        from ..data.sequences import SequenceFormatter
    except ImportError:  # until convret.data ships its formatter
        SequenceFormatter = _ChatMLFormatter
    return SequenceFormatter(tokenizer, max_session_len=config.max_session_len or 10**9,
                             max_passage_len=config.max_passage_len or 10**9,
                             max_response_len=config.max_response_len or 10**9,
                             instruction=config.instruction, passage_instruction=config.passage_instruction)


def passage_ids(formatter: Any, config: Any, passage: Passage | str) -> list[int]:
    """Token ids of a passage to embed: the formatted passage, then the summary tokens when trained so."""
    ids = list(formatter.passage(passage))
    return ids + list(config.summary_token_ids) if config.summary_on_passages else ids


def session_ids(formatter: Any, config: Any, history: Sequence[Turn], query: str) -> list[int]:
    """Token ids of a session to embed: the formatted session, then the summary tokens."""
    return list(formatter.session(history, query)) + list(config.summary_token_ids)


def iter_collection(path: str | os.PathLike) -> Iterator[Passage]:
    from ..data import read_collection

    return read_collection(path, strict=True)


def iter_conversations(path: str | os.PathLike) -> Iterator[EvalTurn]:
    from ..data import read_conversations

    return read_conversations(path, strict=True)


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    from ..data import read_qrels

    return read_qrels(path, strict=True)


def load_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    from ..data import read_run

    return read_run(path, strict=True)


def save_run(path: str | os.PathLike, results: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> None:
    from ..data import write_run

    write_run(path, results, tag)


# ---------------------------------------------------------------------- interim formatter (until convret.data.sequences)
class _ChatMLFormatter:
    def __init__(self, tokenizer, max_session_len=1024, max_passage_len=384, max_response_len=384,
                 instruction=None, passage_instruction=None):
        self.tokenizer, self.instruction, self.passage_instruction = tokenizer, instruction, passage_instruction
        self.max_session_len, self.max_passage_len, self.max_response_len = (max_session_len, max_passage_len,
                                                                             max_response_len)

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def session(self, history, query):
        turns = [self._ids(f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n") for t in history]
        head = self._ids(f"<|im_start|>system\n{self.instruction}<|im_end|>\n") if self.instruction else []
        last = self._ids(f"<|im_start|>user\n{query}<|im_end|>\n")
        while turns and len(head) + sum(map(len, turns)) + len(last) > self.max_session_len:
            turns.pop(0)
        out = head + [i for t in turns for i in t] + last
        return out if len(out) <= self.max_session_len else head + last[len(out) - self.max_session_len:]

    def passage(self, passage):
        text = passage if isinstance(passage, str) else (f"{passage.title} {passage.text}" if passage.title
                                                          else passage.text)
        return self._ids(f"<|im_start|>assistant\n{text}<|im_end|>\n")[: self.max_passage_len]

    def response(self, text):
        return self._ids(text)[: self.max_response_len]
