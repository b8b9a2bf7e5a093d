"""SessionLayout: mask_start, dense mask, pooling, position ids, tile classification, validation."""
import pytest
import torch
from hypothesis import given, strategies as st

from convret import SessionLayout
from layout_strategies import layouts, segment_batches


def mask_from_segments(segments, seq_len):
    """Independent oracle: the CSIT mask written out sample by sample, without mask_start."""
    mask = torch.zeros(len(segments), seq_len, seq_len, dtype=torch.bool)
    for b, row in enumerate(segments):
        start = 0
        for prefix_len, summary_len, response_len in row:
            response_start = start + prefix_len + summary_len
            end = response_start + response_len
            for q in range(start, end):
                for j in range(start, q + 1):
                    is_prefix_key = j < start + prefix_len
                    mask[b, q, j] = not (is_prefix_key and q >= response_start)
            start = end
    return mask


@given(segment_batches())
def test_dense_mask_matches_segment_oracle(batch):
    segments, seq_len = batch
    layout = SessionLayout.from_segments(segments, seq_len)
    assert layout.mask_start.dtype == torch.int32
    assert layout.mask_start.shape == (len(segments), seq_len)
    assert torch.equal(layout.dense_mask(), mask_from_segments(segments, seq_len))


def test_csit_sample_by_hand():
    # session 3, summary 2, response 2 (+ its own summary counted in response_len), then 2 padding
    layout = SessionLayout.from_segments([[(3, 2, 2)]], seq_len=9)
    assert layout.mask_start.tolist() == [[5, 5, 5, 7, 7, 7, 7, 7, 8]]
    mask = layout.dense_mask()[0]
    assert mask[5, :].tolist() == [False, False, False, True, True, True, False, False, False]
    assert not mask[7:].any()  # padding rows see nothing


def test_chatretriever_separator_variant_is_one_more_summary_token():
    # ChatRetriever's released code leaves the separator visible: t + 1 "summary" tokens
    strict = SessionLayout.from_segments([[(4, 3, 3)]], seq_len=10).dense_mask()[0]
    compatible = SessionLayout.from_segments([[(3, 4, 3)]], seq_len=10).dense_mask()[0]
    assert not strict[7, 3] and compatible[7, 3]
    assert torch.equal(strict[:7], compatible[:7])


@given(segment_batches())
def test_pooling_positions_and_position_ids(batch):
    segments, seq_len = batch
    layout = SessionLayout.from_segments(segments, seq_len)
    pooling = layout.pooling_positions()
    position_ids = layout.position_ids()
    expected_pooling = []
    for b, row in enumerate(segments):
        start = 0
        for prefix_len, summary_len, response_len in row:
            expected_pooling.append([b, start + prefix_len + summary_len - 1])
            length = prefix_len + summary_len + response_len
            assert position_ids[b, start : start + length].tolist() == list(range(length))
            start += length
    assert pooling.dtype == torch.long and pooling.tolist() == expected_pooling
    assert position_ids.dtype == torch.long and position_ids.shape == (len(segments), seq_len)


def brute_force_tile_classes(layout: SessionLayout, block_m: int, block_n: int, window=None) -> torch.Tensor:
    """The oracle, from the dense mask alone: a tile with no visible pair is skipped, a tile whose every pair
    (inside the [L, L] bounds) is visible is full, anything else, edge tiles that overhang L included, partial."""
    mask = layout.dense_mask(window)
    batch, seq_len, _ = mask.shape
    q_tiles, k_tiles = -(-seq_len // block_m), -(-seq_len // block_n)
    padded = torch.zeros(batch, q_tiles * block_m, k_tiles * block_n, dtype=torch.bool)
    padded[:, :seq_len, :seq_len] = mask
    tiles = padded.view(batch, q_tiles, block_m, k_tiles, block_n)
    any_visible = tiles.any(4).any(2)
    all_visible = tiles.all(4).all(2)
    classes = torch.full(any_visible.shape, 2, dtype=torch.int8)
    classes[all_visible] = 1
    classes[~any_visible] = 0
    return classes


@given(layouts(max_padding=40), st.sampled_from([16, 32]), st.sampled_from([16, 32, 64]))
def test_tile_classes_equal_the_dense_mask_oracle(layout, block_m, block_n):
    """Exact, not only safe: every tile the mask lets the kernels skip is skipped, every mask-free tile runs
    without the mask (a classifier that marks every tile partial fails here)."""
    assert torch.equal(layout.tile_classes(block_m, block_n), brute_force_tile_classes(layout, block_m, block_n))


@given(segment_batches(), st.integers(1, 30))
def test_dense_mask_with_a_window_is_the_band_of_the_mask(batch, window):
    segments, seq_len = batch
    layout = SessionLayout.from_segments(segments, seq_len)
    positions = torch.arange(seq_len)
    band = (positions.view(-1, 1) - positions.view(1, -1)) < window  # query - key < window
    assert torch.equal(layout.dense_mask(window), mask_from_segments(segments, seq_len) & band)


@given(layouts(max_padding=40), st.sampled_from([8, 16, 32]), st.sampled_from([8, 16, 64]), st.integers(1, 50))
def test_tile_classes_with_a_window_are_safe_and_skip_what_the_window_hides(layout, block_m, block_n, window):
    """With a sliding window: every tile classified skipped has no visible pair and every tile classified full
    has no hidden one (what the kernels need); every tile the window alone hides (all its keys too old for every
    query of the tile) is skipped; and a window no shorter than the row classifies every tile as no window does
    (the window costs nothing when it hides nothing)."""
    classes = layout.tile_classes(block_m, block_n, window)
    exact = brute_force_tile_classes(layout, block_m, block_n, window)
    assert not bool(((classes == 0) & (exact != 0)).any())
    assert not bool(((classes == 1) & (exact != 1)).any())
    q_first = (torch.arange(classes.shape[1]) * block_m).view(1, -1, 1)
    k_last = (torch.arange(classes.shape[2]) * block_n + block_n - 1).view(1, 1, -1)
    assert bool((classes[(k_last <= q_first - window).expand_as(classes)] == 0).all())
    assert torch.equal(layout.tile_classes(block_m, block_n, layout.seq_len), layout.tile_classes(block_m, block_n))
    assert torch.equal(layout.tile_classes(block_m, block_n, None), brute_force_tile_classes(layout, block_m, block_n))


def test_window_validation():
    layout = SessionLayout.from_segments([[(5, 2, 3)]], seq_len=12)
    for bad in (0, -3, True, 2.5, "4"):
        with pytest.raises(ValueError, match="window must be None or a positive number of keys"):
            layout.dense_mask(bad)


def counts(classes: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int((classes == c).sum()) for c in range(3))


def test_readme_layouts_masked_fraction_and_tile_counts():
    """The README's two benchmark layouts: csit (one CSIT sample, L = 1414) and packed (a CSIT sample and six
    passages of 384 + 3 in a 4096 row). Masked fractions and tile counts from the dense mask; the README's
    tile table (fwd 128 x 64, dkdv / dq 64 x 32) states the csit counts."""
    csit = SessionLayout.from_segments([[(1024, 3, 387)]], seq_len=1414)
    packed = SessionLayout.from_segments([[(1024, 3, 387)] + [(384, 3, 0)] * 6], seq_len=4096)
    assert round(100 * (1 - csit.dense_mask().float().mean().item())) == 70
    assert round(100 * (1 - packed.dense_mask().float().mean().item())) == 94
    for layout in (csit, packed):
        for block_m, block_n in ((128, 64), (64, 32)):
            assert torch.equal(layout.tile_classes(block_m, block_n),
                               brute_force_tile_classes(layout, block_m, block_n))
    assert counts(brute_force_tile_classes(csit, 128, 64)) == (169, 62, 45)  # README: 276 tiles
    assert counts(brute_force_tile_classes(csit, 64, 32)) == (676, 270, 89)  # README: 1035 tiles


def test_csit_layout_has_all_three_tile_classes():
    layout = SessionLayout.from_segments([[(200, 3, 100)], [(60, 3, 0), (60, 3, 0)]], seq_len=320)
    classes = layout.tile_classes(32, 32)
    assert set(classes.unique().tolist()) == {0, 1, 2}
    # response query tiles skip the session key tiles they may not see (beyond causality)
    assert classes[0, 8, 0] == 0 and classes[0, 3, 0] == 1


def test_moving_a_layout_keeps_one_copy_per_device():
    layout = SessionLayout.from_segments([[(5, 2, 3)]], seq_len=12)
    assert layout.to("cpu") is layout
    moved = layout.to("meta")
    assert moved is layout.to("meta") and moved.mask_start.device.type == "meta"


def test_tile_bounds_are_cached_per_width():
    layout = SessionLayout.from_segments([[(100, 3, 40)], [(50, 0, 0)]], seq_len=150)
    assert layout.tile_bounds(64) is layout.tile_bounds(64)
    bounds = layout.tile_bounds(64)
    assert bounds.min_mask_start.shape == (2, 3)
    assert bounds.max_mask_start[0].tolist() == [103, 143, 143]  # padding keys 143.. are seen by nobody
    assert bounds.min_mask_start[1].tolist() == [50, 64, 128]


@pytest.mark.parametrize(
    "segments, seq_len, field",
    [
        ([[(-1, 2, 3)]], 10, "prefix_len"),
        ([[(1, 2.5, 3)]], 10, "summary_len"),
        ([[(1, 2, "3")]], 10, "response_len"),
        ([[(4, 0, 3)]], 10, "summary_len"),
        ([[(4, 2, 3)], [(8, 2, 3)]], 10, "seq_len"),
        ([], 10, "empty batch"),
        ([[(1, 2)]], 10, "tuple"),
        ([[(0, 0, 0)]], 10, "at least one token"),
        ([[(1, 1, 1)]], 0, "seq_len"),
    ],
)
def test_malformed_segments_raise_value_error_naming_the_field(segments, seq_len, field):
    with pytest.raises(ValueError, match=field):
        SessionLayout.from_segments(segments, seq_len)


def test_public_constructor_validates_mask_start_against_segments():
    good = SessionLayout.from_segments([[(5, 2, 3)], [(4, 0, 0), (3, 1, 0)]], seq_len=12)
    rebuilt = SessionLayout(good.mask_start.clone(), good.segments)
    assert torch.equal(rebuilt.mask_start, good.mask_start) and rebuilt.segments == good.segments
    assert torch.equal(rebuilt.dense_mask(), good.dense_mask())
    wrong = good.mask_start.clone()
    wrong[0, 6] += 1  # a response key visible one row longer than its sample allows
    with pytest.raises(ValueError, match="row 0, key 6"):
        SessionLayout(wrong, good.segments)
    with pytest.raises(ValueError, match="2 rows but segments describe 1"):
        SessionLayout(good.mask_start, good.segments[:1])
    with pytest.raises(ValueError, match="integer"):
        SessionLayout(good.mask_start.float(), good.segments)
    with pytest.raises(ValueError, match="seq_len"):  # segments longer than mask_start's L
        SessionLayout(good.mask_start[:, :8], good.segments)
