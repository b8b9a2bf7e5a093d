"""Hypothesis strategies for random SessionLayouts, shared by every attention test.

Rows hold 1 to 4 samples: CSIT LM samples (summary 1..4, response 0, 1 or many tokens), plain causal samples
(response 0, summary 0..4), then 0..max_padding padding positions; seq_len is the longest row plus padding,
so it is rarely a multiple of any tile size.
"""
from __future__ import annotations

from hypothesis import strategies as st

from convret import SessionLayout


@st.composite
def samples(draw, max_prefix: int = 20, max_response: int = 12):
    kind = draw(st.sampled_from(["lm", "lm_one_token", "causal"]))
    prefix_len = draw(st.integers(1, max_prefix))
    if kind == "causal":
        return (prefix_len, draw(st.integers(0, 4)), 0)
    summary_len = draw(st.integers(1, 4))
    response_len = 1 if kind == "lm_one_token" else draw(st.integers(0, max_response))
    return (prefix_len, summary_len, response_len)


@st.composite
def segment_batches(draw, max_rows: int = 2, max_samples: int = 4, max_padding: int = 10, **sample_kwargs):
    """(segments, seq_len) for ``SessionLayout.from_segments``."""
    num_rows = draw(st.integers(1, max_rows))
    rows = [draw(st.lists(samples(**sample_kwargs), min_size=1, max_size=max_samples)) for _ in range(num_rows)]
    longest = max(sum(map(sum, row)) for row in rows)
    seq_len = longest + draw(st.integers(0, max_padding))
    return rows, seq_len


@st.composite
def layouts(draw, **kwargs) -> SessionLayout:
    rows, seq_len = draw(segment_batches(**kwargs))
    return SessionLayout.from_segments(rows, seq_len)
