"""SessionLayout: the O(L) description of a batch of packed CSIT rows.

A row of length L holds samples back to back, then padding. A sample is ``(prefix_len, summary_len,
response_len)`` and occupies ``prefix_len + summary_len + response_len`` consecutive positions:

- a CSIT LM sample: prefix = session text, summary = the t summary tokens, response = the response tokens
  followed by their own summary tokens. Response rows see the summary and earlier response tokens only.
- a plain causal sample (a session or passage to embed): ``response_len == 0``.
- the ChatRetriever-compatible variant (separator left visible to the response): ``summary_len = t + 1``.

The whole mask is one int32 per key, ``mask_start[b, j]``: the first query row that may *not* see key j.
Row q may attend to key j iff ``j <= q`` and ``q < mask_start[b, j]``.

A sliding window of ``w`` keys (Mistral, Qwen2's ``use_sliding_window``, FlashAttention-2's ``window_size``) is a
lower bound per query row beside it: row q then also needs ``q - j < w``. The window belongs to an attention layer,
not to the batch (models mix windowed and full layers over one batch), so it is an argument of the attention
functions and of :meth:`SessionLayout.dense_mask` / :meth:`SessionLayout.tile_classes`, never part of the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Sequence

import torch

Segment = tuple[int, int, int]


@dataclass(frozen=True)
class TileBounds:
    """Per key tile min / max of ``mask_start`` for one tile width, int32 ``[B, num_key_tiles]``.

    Keys that nobody sees (padding, and positions past the end of the row) are left out of the max, so a
    tile of them is skipped by every query tile; the min keeps them, which only makes "full" stricter.
    """

    block_n: int
    min_mask_start: torch.Tensor
    max_mask_start: torch.Tensor


class SessionLayout:
    """Compact attention layout of a ``[B, L]`` batch. Build it with :meth:`from_segments`.

    Example::

        layout = SessionLayout.from_segments([[(1024, 3, 387)], [(384, 3, 0), (384, 3, 0)]], seq_len=1414)
        out = convret.session_attention(q, k, v, layout)
    """

    def __init__(self, mask_start: torch.Tensor, segments: Sequence[Sequence[Sequence[int]]]):
        """Validating constructor: ``mask_start`` (int ``[B, L]``) must be exactly what
        :meth:`from_segments` builds from ``segments`` with ``seq_len = L``, since the kernels read
        ``mask_start`` while the fallback, pooling and position ids read the segments. Raises ``ValueError``
        otherwise. Prefer :meth:`from_segments`, which builds both."""
        if not isinstance(mask_start, torch.Tensor) or mask_start.dim() != 2 or mask_start.dtype.is_floating_point:
            raise ValueError(f"mask_start must be an integer [B, L] tensor, got "
                             f"{tuple(getattr(mask_start, 'shape', ()))} {getattr(mask_start, 'dtype', type(mask_start))}")
        expected = SessionLayout.from_segments(segments, mask_start.shape[1])
        if expected.batch_size != mask_start.shape[0]:
            raise ValueError(f"mask_start has {mask_start.shape[0]} rows but segments describe {expected.batch_size}")
        given = mask_start.detach().to("cpu", torch.int32)
        if not torch.equal(given, expected.mask_start):
            b, j = (given != expected.mask_start).nonzero()[0].tolist()
            raise ValueError(f"mask_start disagrees with segments at row {b}, key {j}: {given[b, j].item()} given, "
                             f"{expected.mask_start[b, j].item()} built from the segments")
        self._init(mask_start.to(torch.int32), expected.segments)

    @classmethod
    def _trusted(cls, mask_start: torch.Tensor, segments: list[list[Segment]]) -> "SessionLayout":
        """No validation: for :meth:`from_segments` and :meth:`to`, which build the two consistently."""
        layout = cls.__new__(cls)
        layout._init(mask_start, segments)
        return layout

    def _init(self, mask_start: torch.Tensor, segments: list[list[Segment]]) -> None:
        self.mask_start = mask_start
        self.segments = segments
        self._tile_bounds: dict[int, TileBounds] = {}
        self._position_ids: torch.Tensor | None = None
        self._max_span: int | None = None
        self._copies: dict[torch.device, SessionLayout] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_segments(
        cls,
        segments: Sequence[Sequence[Sequence[int]]],
        seq_len: int,
        device: torch.device | str | None = None,
    ) -> "SessionLayout":
        """One list per row of ``(prefix_len, summary_len, response_len)``; positions after a row's last
        sample are padding. Raises ``ValueError`` naming the bad field on malformed input."""
        if not isinstance(seq_len, Integral) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or len(segments) == 0:
            raise ValueError("segments must be a non-empty list with one list of samples per row (empty batch)")
        seq_len = int(seq_len)
        rows: list[list[Segment]] = []
        mask_start = torch.empty(len(segments), seq_len, dtype=torch.int32)
        for b, row in enumerate(segments):
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise ValueError(f"segments[{b}] must be a list of (prefix_len, summary_len, response_len) tuples")
            clean_row: list[Segment] = []
            pos = 0
            for i, sample in enumerate(row):
                prefix_len, summary_len, response_len = _check_sample(sample, b, i)
                end = pos + prefix_len + summary_len + response_len
                if end > seq_len:
                    raise ValueError(
                        f"row {b}: samples need {end} positions after sample {i} but seq_len is {seq_len}"
                    )
                response_start = pos + prefix_len + summary_len
                prefix_visible_until = response_start if response_len > 0 else end
                mask_start[b, pos : pos + prefix_len] = prefix_visible_until
                mask_start[b, pos + prefix_len : end] = end
                clean_row.append((prefix_len, summary_len, response_len))
                pos = end
            mask_start[b, pos:] = torch.arange(pos, seq_len, dtype=torch.int32)  # padding: nobody sees it
            rows.append(clean_row)
        return cls._trusted(mask_start.to(device) if device is not None else mask_start, rows)

    # ------------------------------------------------------------------ shape / device
    @property
    def batch_size(self) -> int:
        return self.mask_start.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask_start.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mask_start.device

    @property
    def num_samples(self) -> int:
        return sum(len(row) for row in self.segments)

    def to(self, device: torch.device | str) -> "SessionLayout":
        """This layout on ``device``. The copy is kept, so that every layer of a model reuses one transfer and
        one set of tile metadata."""
        device = torch.device(device)
        if device.type == self.device.type and device.index in (None, self.device.index):
            return self
        moved = self._copies.get(device)
        if moved is None:
            moved = SessionLayout._trusted(self.mask_start.to(device), self.segments)
            self._copies[device] = moved
        return moved

    def __repr__(self) -> str:
        return f"SessionLayout(batch={self.batch_size}, seq_len={self.seq_len}, samples={self.num_samples})"

    # ------------------------------------------------------------------ derived views
    def dense_mask(self, window: int | None = None) -> torch.Tensor:
        """bool ``[B, L, L]``, True = query row may attend to key column; with ``window``, row q sees only keys
        ``j > q - window`` besides. Debugging and oracles only: O(L^2)."""
        window = check_window(window)
        positions = torch.arange(self.seq_len, device=self.device)
        query = positions.view(1, -1, 1)
        key = positions.view(1, 1, -1)
        mask = (key <= query) & (query < self.mask_start.unsqueeze(1))
        if window is not None:
            mask = mask & (key > query - window)
        return mask

    def pooling_positions(self) -> torch.Tensor:
        """LongTensor ``[num_samples, 2]`` of (row, position of the sample's last summary token), row-major.

        A sample with ``summary_len == 0`` pools at its last prefix token."""
        pairs = []
        for b, row in enumerate(self.segments):
            pos = 0
            for prefix_len, summary_len, response_len in row:
                pairs.append((b, pos + prefix_len + summary_len - 1))
                pos += prefix_len + summary_len + response_len
        return torch.tensor(pairs, dtype=torch.long, device=self.device).view(-1, 2)

    def position_ids(self) -> torch.Tensor:
        """LongTensor ``[B, L]`` restarting at 0 for each packed sample (padding continues counting)."""
        if self._position_ids is None:
            ids = torch.empty(self.batch_size, self.seq_len, dtype=torch.long)
            for b, row in enumerate(self.segments):
                pos = 0
                for sample in row:
                    length = sum(sample)
                    ids[b, pos : pos + length] = torch.arange(length)
                    pos += length
                ids[b, pos:] = torch.arange(self.seq_len - pos)
            self._position_ids = ids.to(self.device)
        return self._position_ids

    def max_attention_span(self) -> int:
        """The largest ``q - j`` over visible pairs (query q sees key j): a sliding window of ``w`` keys
        (``q - j < w``) hides nothing iff this is below ``w`` (the attention functions then drop it, so that it
        costs nothing). -1 for a layout of padding only. Cached."""
        if self._max_span is None:
            positions = torch.arange(self.seq_len, device=self.device, dtype=torch.int64)
            # key j is seen by rows j .. mask_start - 1; padding keys (mask_start <= j) by nobody
            self._max_span = int((self.mask_start.to(torch.int64) - 1 - positions).max().clamp(min=-1))
        return self._max_span

    def tile_bounds(self, block_n: int) -> TileBounds:
        """Per key tile min / max of ``mask_start`` for tiles of ``block_n`` keys, computed once and cached,
        so that every layer of a forward pass reuses it."""
        cached = self._tile_bounds.get(block_n)
        if cached is None:
            num_tiles = -(-self.seq_len // block_n)
            padded_len = num_tiles * block_n
            overhang = padded_len - self.seq_len
            ms = self.mask_start
            # a key with mask_start <= its own position is seen by nobody (padding): it must not raise the
            # tile max, or diagonal padding tiles would count as partial instead of skipped
            key_pos = torch.arange(self.seq_len, device=self.device, dtype=ms.dtype)
            live_ms = torch.where(ms > key_pos, ms, torch.zeros_like(ms))
            big = torch.iinfo(torch.int32).max
            pad = torch.nn.functional.pad
            tiles_for_min = pad(ms, (0, overhang), value=big).view(self.batch_size, num_tiles, block_n)
            tiles_for_max = pad(live_ms, (0, overhang), value=0).view(self.batch_size, num_tiles, block_n)
            cached = TileBounds(
                block_n,
                tiles_for_min.amin(-1).to(torch.int32).contiguous(),
                tiles_for_max.amax(-1).to(torch.int32).contiguous(),
            )
            self._tile_bounds[block_n] = cached
        return cached

    def tile_classes(self, block_m: int, block_n: int, window: int | None = None) -> torch.Tensor:
        """int8 ``[B, num_query_tiles, num_key_tiles]``: 0 = skipped, 1 = full (no mask), 2 = partial.

        The rule the kernels apply, materialised for tests and statistics (O((L / tile)^2)). With a sliding
        ``window``, a key tile is also skipped when its last key is too old for the tile's first query
        (``k_last <= q_first - window``), and full only if its first key is recent enough for the last query
        (``k_first > q_last - window``); without one the rule is the plain one."""
        window = check_window(window)
        bounds = self.tile_bounds(block_n)
        num_q_tiles = -(-self.seq_len // block_m)
        q_first = (torch.arange(num_q_tiles, device=self.device) * block_m).view(1, -1, 1)
        q_last = q_first + block_m - 1
        k_first = (torch.arange(bounds.min_mask_start.shape[1], device=self.device) * block_n).view(1, 1, -1)
        k_last = k_first + block_n - 1
        min_ms = bounds.min_mask_start.unsqueeze(1)
        max_ms = bounds.max_mask_start.unsqueeze(1)
        skipped = (k_first > q_last) | (max_ms <= q_first)
        full = (k_last <= q_first) & (min_ms > q_last)
        if window is not None:
            skipped = skipped | (k_last <= q_first - window)
            full = full & (k_first > q_last - window)
        classes = torch.full(skipped.shape, 2, dtype=torch.int8, device=self.device)
        classes[full] = 1
        classes[skipped] = 0
        return classes


def check_window(window: object) -> int | None:
    """A sliding window: None (no window) or a positive number of keys (query q sees keys ``j > q - window``).
    Raises ``ValueError`` otherwise."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, Integral) or window <= 0:
        raise ValueError(f"window must be None or a positive number of keys (query q sees keys j with "
                         f"q - j < window), got {window!r}")
    return int(window)


def _check_sample(sample: object, row: int, index: int) -> Segment:
    where = f"segments[{row}][{index}]"
    if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence) or len(sample) != 3:
        raise ValueError(f"{where} must be a (prefix_len, summary_len, response_len) tuple, got {sample!r}")
    names = ("prefix_len", "summary_len", "response_len")
    values = []
    for name, value in zip(names, sample):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{where}: {name} must be >= 0, got {value}")
        values.append(int(value))
    prefix_len, summary_len, response_len = values
    if response_len > 0 and summary_len == 0:
        raise ValueError(f"{where}: summary_len must be > 0 for a sample with a response (response_len={response_len})")
    if prefix_len + summary_len + response_len == 0:
        raise ValueError(f"{where}: a sample must hold at least one token (prefix_len + summary_len + response_len == 0)")
    return prefix_len, summary_len, response_len
