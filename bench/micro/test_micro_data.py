"""Host-side batch preparation: the layout with its tile metadata, and the collator.

- group ``layout``: convret ``from_segments`` builds the O(L) layout of a packed batch and then the tile
  metadata the kernels read (``tile_bounds`` for key tiles of 64 and 128); the peer ``dense-additive-mask``
  builds the same layout and then the dense ``[B, 1, L, L]`` bf16 additive mask that the eager / SDPA peers
  consume, which is what a dense-mask pipeline pays per batch instead.
- group ``collator``: ``CSITCollator`` on a batch of CSIT examples with random token counts (sessions,
  positives, one hard negative, responses), packed first-fit decreasing into rows of ``max_len`` tokens. No peer:
  its times are tracked by the absolute comparison only.
"""
from __future__ import annotations

import random

import pytest
import torch

import convret
from convret.baselines import additive_mask
from micro_common import CSIT_COLLATOR, CSIT_PACKED, SMALL_COLLATOR, SMALL_PACKED, MicroRun, pick

TILE_WIDTHS = (64, 128)
SUMMARY_IDS = (32000, 32001, 32002)
VOCAB = 32000


@pytest.mark.parametrize("shape_name, impl", [
    pytest.param(shape, impl, id=f"{shape}-{impl}")
    for shape in ("small", "csit") for impl in ("dense-additive-mask", "from_segments+tile_bounds")
])
def test_layout(benchmark, micro: MicroRun, shape_name: str, impl: str) -> None:
    shape = pick(shape_name, micro.smoke, CSIT_PACKED, SMALL_PACKED)
    segments = shape.segments()

    if impl == "dense-additive-mask":
        def build():
            layout = convret.SessionLayout.from_segments(segments, shape.seq_len)
            return layout, additive_mask(layout, torch.bfloat16)
    else:
        def build():
            layout = convret.SessionLayout.from_segments(segments, shape.seq_len)
            return layout, [layout.tile_bounds(width) for width in TILE_WIDTHS]

    benchmark.group = f"layout {shape_name}"
    layout, _ = benchmark(build)
    assert layout.num_samples == shape.rows * (1 + shape.passages)
    micro.record(benchmark, impl, "peer" if impl == "dense-additive-mask" else "convret",
                 {"rows": shape.rows, "L": shape.seq_len, "samples_per_row": 1 + shape.passages,
                  "tile_widths": list(TILE_WIDTHS)})


def _examples(shape, seed: int = 0) -> list[convret.CSITExample]:
    rng = random.Random(seed)

    def tokens(bounds: tuple[int, int]) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(*bounds))]

    return [
        convret.CSITExample(session=tokens(shape.session), positive=tokens(shape.passage),
                            negatives=[tokens(shape.passage) for _ in range(shape.negatives)],
                            response=tokens(shape.response))
        for _ in range(shape.examples)
    ]


@pytest.mark.parametrize("shape_name", ["small", "csit"])
def test_collator(benchmark, micro: MicroRun, shape_name: str) -> None:
    shape = pick(shape_name, micro.smoke, CSIT_COLLATOR, SMALL_COLLATOR)
    examples = _examples(shape)
    collator = convret.CSITCollator(summary_token_ids=SUMMARY_IDS, pad_token_id=0, max_len=shape.max_len)
    benchmark.group = f"collator {shape_name}"
    batch = benchmark(collator, examples)
    assert batch.query_positions.shape[0] == shape.examples
    assert batch.passage_positions.shape[0] == shape.examples * (1 + shape.negatives)
    micro.record(benchmark, "CSITCollator", "solo",
                 {"examples": shape.examples, "negatives": shape.negatives, "max_len": shape.max_len},
                 packed={key: batch.stats[key] for key in ("rows", "seq_len", "real_tokens", "fill", "lm_tokens")})
