"""Incremental session encoding: each new turn runs on top of the cached keys / values of the session so far.

Session rows are ordinary causal rows, so the keys and values of a session's first n tokens depend on those n
tokens only. :class:`SessionEncoder` keeps, per conversation id, the token ids of the last session it encoded
(without the summary tokens) and every layer's keys / values of them. The next request of that conversation is
tokenised exactly as ``convret encode`` tokenises a session (the checkpoint's ``SequenceFormatter.session``,
then its summary block: the summary tokens, after the separator under ``chatretriever_compat``); the longest
common token prefix with the cached ids is reused and only the rest (the new turn's tokens and the summary block)
runs, through :func:`convret.ops.session_attention.cached.cached_session_attention`.
The summary tokens' keys / values are never cached (the next turn's tokens come before the next summary).

When truncation (``max_session_len``) starts dropping the oldest turns, or a turn is edited, the common prefix
shrinks: what is left is recomputed and counted in :attr:`CacheStats.prefix_changes`.

Memory: the cache holds at most ``cache_bytes`` bytes (keys, values and token ids), evicting the least recently
used conversations; a session larger than the whole budget is not cached. An evicted conversation is simply
recomputed at its next request.

Example::

    enc = SessionEncoder(Encoder.from_checkpoint("runs/tiny/final"), cache_mb=256)
    vec, info = enc.encode("conv-1", [Turn("user", "tell me about the lighthouse")])
    vec, info = enc.encode("conv-1", [Turn("user", "tell me about the lighthouse"),
                                      Turn("assistant", "it is red"), Turn("user", "and how tall is it?")])
    info.reused_tokens, info.computed_tokens
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..ops.session_attention.cached import CachedPrefill
from ..data.records import ASSISTANT, USER, Passage, Turn
from ..layout import SessionLayout
from .encoder import Encoder, decoder_of, pack_by_budget

__all__ = ["SessionEncoder", "EncodeInfo", "CacheStats", "SessionRequest", "PassageRequest", "turns_of"]

_ID_BYTES = 8  # a cached token id, counted as an int64
_COUNTERS = {"hit": "hits", "miss": "misses", "changed": "prefix_changes"}


def turns_of(turns: Sequence[Turn | dict]) -> list[Turn]:
    """``Turn`` objects of ``[{"role", "text"}]`` dicts (or Turns); the last one is the current user query.

    Raises ``ValueError`` for no turns, a role other than user / assistant, an empty text, or a last turn that
    is not the user's."""
    out = []
    for i, turn in enumerate(turns):
        role, text = (turn.role, turn.text) if isinstance(turn, Turn) else (turn.get("role"), turn.get("text"))
        role = role.lower() if isinstance(role, str) else role
        if role not in (USER, ASSISTANT):
            raise ValueError(f"turns[{i}].role must be {USER!r} or {ASSISTANT!r}, got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"turns[{i}].text is empty")
        out.append(Turn(role, text))
    if not out:
        raise ValueError("a session needs at least one turn")
    if out[-1].role != USER:
        raise ValueError(f"the last turn is the query and must be the user's, got role {out[-1].role!r}")
    return out


@dataclass
class SessionRequest:
    """A session to embed: ``tokens`` (session ids + summary ids) of conversation ``conversation_id``
    (``None``: not cached). Build with :meth:`SessionEncoder.session_request`."""

    conversation_id: str | None
    tokens: list[int]
    session_len: int  # tokens without the summary tokens: what may be cached


@dataclass
class PassageRequest:
    tokens: list[int]


@dataclass
class EncodeInfo:
    """How one sequence was encoded.

    Attributes:
        reused_tokens: cached tokens whose keys / values were reused.
        computed_tokens: tokens run through the model (new session tokens + summary tokens).
        total_tokens: the sequence's length (``reused_tokens + computed_tokens``).
        cache: ``"hit"`` (a prefix reused), ``"miss"`` (nothing cached for the conversation), ``"changed"`` (a
            cached session that is not a prefix: an edit or truncation; the common prefix is reused) or
            ``"none"`` (no conversation id, or a passage).
    """

    reused_tokens: int
    computed_tokens: int
    total_tokens: int
    cache: str


@dataclass
class CacheStats:
    """Counters of a :class:`SessionEncoder`'s cache (cumulative, except ``bytes`` and ``conversations``)."""

    budget_bytes: int
    bytes: int = 0
    conversations: int = 0
    hits: int = 0
    misses: int = 0
    prefix_changes: int = 0
    evictions: int = 0
    uncacheable: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    max_bytes_seen: int = 0
    forwards: int = 0


@dataclass
class _Entry:
    tokens: list[int]
    kv: torch.Tensor  # [num_layers, 2, Hkv, n, D]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.kv.numel() * self.kv.element_size() + _ID_BYTES * len(self.tokens)


class SessionEncoder:
    """Sessions and passages to embeddings, reusing each conversation's cached prefix (module docstring).

    Args:
        encoder: a loaded :class:`Encoder` (model, tokenizer, training-time formatter).
        cache_mb: the cache's byte budget in MiB (0: no caching).
        token_budget: tokens run per packed row (as ``convret encode``'s ``--token-budget``; cached tokens do
            not count: they add keys and values, not activations).

    Thread-safe: one lock serialises encodes (one forward at a time is what the hardware does anyway).
    """

    def __init__(self, encoder: Encoder, cache_mb: float = 256.0, token_budget: int | None = None):
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.encoder = encoder
        self.decoder = decoder_of(encoder.model)
        self.device = next(self.decoder.parameters()).device
        self.token_budget = token_budget or encoder.token_budget
        self.normalize = bool(encoder.config.normalize)
        # the ids convret encode appends to a session: [separator, EMB_1..EMB_t] under chatretriever_compat
        self.summary_ids = list(encoder.config.summary_block())
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self.stats = CacheStats(budget_bytes=int(cache_mb * 2**20))
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ requests
    def session_request(self, conversation_id: str | None, turns: Sequence[Turn | dict]) -> SessionRequest:
        """Tokenise a session exactly as ``convret encode`` does (raises ``ValueError`` on bad turns)."""
        clean = turns_of(turns)
        session = self.encoder.formatter.session(clean[:-1], clean[-1].text)
        return SessionRequest(conversation_id, list(session) + self.summary_ids, len(session))

    def passage_request(self, passage: Passage | str) -> PassageRequest:
        return PassageRequest(self.encoder.passage_tokens(passage))

    # ------------------------------------------------------------------ public API
    def encode(self, conversation_id: str | None, turns: Sequence[Turn | dict]) -> tuple[np.ndarray, EncodeInfo]:
        """The embedding (float32 ``[dim]``) of the session ``turns`` (the last one the user's query) and how
        it was encoded. Equal to ``convret encode``'s embedding of that session."""
        vectors, infos = self.encode_requests([self.session_request(conversation_id, turns)])
        return vectors[0], infos[0]

    def encode_requests(self, requests: Sequence[SessionRequest | PassageRequest]
                        ) -> tuple[np.ndarray, list[EncodeInfo]]:
        """Embeddings ``[n, dim]`` (float32) of prepared requests and how each was encoded, in one forward
        pass: the requests are packed into rows of at most ``token_budget`` tokens to run (a longer one gets a
        row of its own; with nothing cached this is exactly ``convret encode``'s packing), each row holding
        its requests' cached keys / values beside them, and only the new tokens run. Afterwards every session request's cache entry is replaced by its new session."""
        if not requests:
            return np.zeros((0, self.encoder.dim), dtype=np.float32), []
        with self._lock, torch.inference_mode():
            plans = [self._plan(r) for r in requests]
            out = torch.empty(len(requests), self.encoder.dim, dtype=torch.float32)
            # rows hold at most token_budget tokens that run (the activations' memory; a cached prefix only
            # adds its keys / values): without a cache this is exactly convret encode's packing
            rows = pack_by_budget([len(p.new_tokens) for p in plans], self.token_budget)
            self._run(requests, plans, rows, out)
            for request, plan in zip(requests, plans):
                self._account(request, plan)
            return out.numpy(), [p.info for p in plans]

    def full_encode(self, turns: Sequence[Turn | dict]) -> np.ndarray:
        """The session's embedding computed from scratch (no cache read or written): the baseline."""
        return self.encode_requests([self.session_request(None, turns)])[0][0]

    def cache_info(self) -> dict:
        """The cache's counters and size, as a dict (``bytes`` never exceeds ``budget_bytes``). Lock-free (a
        snapshot of plain integers), so that a server's event loop never waits for a forward pass."""
        self.stats.conversations = len(self._cache)
        return dict(self.stats.__dict__)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self.stats.bytes = 0

    def estimate_new_tokens(self, request: SessionRequest | PassageRequest) -> int:
        """Tokens the request would run now (its tokens minus the cached prefix it shares); a hint for
        batching, read without the lock."""
        if isinstance(request, SessionRequest) and request.conversation_id is not None:
            entry = self._cache.get(request.conversation_id)
            if entry is not None:
                return len(request.tokens) - min(_common_prefix(entry.tokens, request.tokens), request.session_len)
        return len(request.tokens)

    def cached_tokens(self, conversation_id: str) -> int:
        entry = self._cache.get(conversation_id)
        return 0 if entry is None else len(entry.tokens)

    # ------------------------------------------------------------------ internals
    @dataclass
    class _Plan:
        reuse: int
        kv: torch.Tensor | None
        new_tokens: list[int]
        key_len: int
        info: EncodeInfo
        new_kv: torch.Tensor | None = None  # [layers, 2, Hkv, m, D] of the new session tokens

    def _plan(self, request: SessionRequest | PassageRequest) -> "SessionEncoder._Plan":
        tokens = request.tokens
        if isinstance(request, PassageRequest) or request.conversation_id is None:
            return self._Plan(0, None, tokens, len(tokens), EncodeInfo(0, len(tokens), len(tokens), "none"))
        entry = self._cache.get(request.conversation_id)
        if entry is None:
            return self._Plan(0, None, tokens, len(tokens), EncodeInfo(0, len(tokens), len(tokens), "miss"))
        self._cache.move_to_end(request.conversation_id)
        common = _common_prefix(entry.tokens, tokens)
        # at least one token must run (the embedding is read at the last one)
        reuse = min(common, request.session_len, len(tokens) - 1)
        status = "hit" if common == len(entry.tokens) else "changed"
        kv = entry.kv[:, :, :, :reuse] if reuse else None
        return self._Plan(reuse, kv, tokens[reuse:], len(tokens),
                          EncodeInfo(reuse, len(tokens) - reuse, len(tokens), status))

    def _run(self, requests, plans, rows, out: torch.Tensor) -> None:
        q_len = max(sum(len(plans[i].new_tokens) for i in row) for row in rows)
        k_len = max(sum(plans[i].key_len for i in row) for row in rows)
        batch = len(rows)
        input_ids = torch.zeros(batch, q_len, dtype=torch.long)
        positions = torch.full((batch, q_len), k_len, dtype=torch.long)
        segments, cached, where = [], [], {}
        for b, row in enumerate(rows):
            start, q = 0, 0
            pieces = []
            for i in row:
                plan = plans[i]
                n = len(plan.new_tokens)
                input_ids[b, q : q + n] = torch.tensor(plan.new_tokens)
                positions[b, q : q + n] = torch.arange(start + plan.reuse, start + plan.key_len)
                if plan.kv is not None:
                    pieces.append((start, plan.kv))
                where[i] = (b, q, n)
                start += plan.key_len
                q += n
            segments.append([(plans[i].key_len, 0, 0) for i in row])
            cached.append(pieces)
        layout = SessionLayout.from_segments(segments, k_len, device=self.device)
        prefill = CachedPrefill(layout, positions.to(self.device), cached)
        hidden = self.decoder(input_ids=input_ids.to(self.device), position_ids=prefill.position_ids(),
                              cached_prefill=prefill, use_cache=False).last_hidden_state
        self.stats.forwards += 1
        layers = sorted(prefill.new_kv)
        for i, plan in enumerate(plans):
            b, q, n = where[i]
            emb = hidden[b, q + n - 1].float()
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[i] = emb.cpu()
            request = requests[i]
            if isinstance(request, SessionRequest) and request.conversation_id is not None:
                m = max(0, request.session_len - plan.reuse)  # new session tokens (not the summary)
                plan.new_kv = torch.stack([torch.stack([prefill.new_kv[l][0][b, :, q : q + m],
                                                        prefill.new_kv[l][1][b, :, q : q + m]]) for l in layers])

    def _account(self, request, plan) -> None:
        stats = self.stats
        stats.reused_tokens += plan.info.reused_tokens
        stats.computed_tokens += plan.info.computed_tokens
        if not isinstance(request, SessionRequest) or request.conversation_id is None:
            return
        counter = _COUNTERS[plan.info.cache]
        setattr(stats, counter, getattr(stats, counter) + 1)
        parts = [plan.kv] if plan.kv is not None else []
        if plan.new_kv is not None and plan.new_kv.shape[3]:
            parts.append(plan.new_kv)
        tokens = request.tokens[: request.session_len]
        # a copy either way: the entry must not keep the previous (longer) entry's storage alive
        kv = torch.cat(parts, dim=3) if len(parts) > 1 else (parts[0].clone() if parts else None)
        self._store(request.conversation_id, tokens, kv)

    def _store(self, conversation_id: str, tokens: list[int], kv: torch.Tensor | None) -> None:
        old = self._cache.pop(conversation_id, None)
        if old is not None:
            self.stats.bytes -= old.nbytes
        if kv is None or not tokens:
            return
        entry = _Entry(tokens, kv)
        if entry.nbytes > self.stats.budget_bytes:
            self.stats.uncacheable += 1
            return
        while self.stats.bytes + entry.nbytes > self.stats.budget_bytes and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self.stats.bytes -= evicted.nbytes
            self.stats.evictions += 1
        self._cache[conversation_id] = entry
        self.stats.bytes += entry.nbytes
        self.stats.max_bytes_seen = max(self.stats.max_bytes_seen, self.stats.bytes)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
