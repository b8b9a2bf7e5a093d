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


@given(layouts(max_padding=40), st.sampled_from([16, 32]), st.sampled_from([16, 32, 64]))
def test_tile_classes_agree_with_dense_mask(layout, block_m, block_n):
    classes = layout.tile_classes(block_m, block_n)
    mask = layout.dense_mask()
    for b in range(layout.batch_size):
        for qt in range(classes.shape[1]):
            for kt in range(classes.shape[2]):
                tile = mask[b, qt * block_m : (qt + 1) * block_m, kt * block_n : (kt + 1) * block_n]
                cls = int(classes[b, qt, kt])
                if cls == 0:
                    assert not tile.any(), "a skipped tile holds a visible pair"
                elif cls == 1:
                    assert tile.shape == (min(block_m, layout.seq_len - qt * block_m), block_n)
                    assert tile.all(), "a full tile holds a masked pair"


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
