"""iBOT's block-wise masks: shape, ratio range, probability, blocks, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from protogmm.data.masking import BlockMasking, block_mask


def test_shape_dtype_and_determinism_under_a_seed() -> None:
    masking = BlockMasking((7, 7))
    first = masking(64, random.Random(5))
    again = masking(64, random.Random(5))
    other = masking(64, random.Random(6))
    assert first.shape == (64, 7, 7) and first.dtype == torch.bool
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (6, 9)])
@pytest.mark.parametrize("ratio", [(0.1, 0.5), (0.3, 0.3), (0.0, 0.2)])
def test_masked_fraction_stays_inside_the_ratio_range(
    grid: tuple[int, int], ratio: tuple[float, float]
) -> None:
    masking = BlockMasking(grid, ratio=ratio, probability=1.0)
    masks = masking(400, random.Random(0))
    fractions = masks.flatten(1).float().mean(1)
    # Never above the largest requested ratio (each block fits the remaining budget) ...
    assert float(fractions.max()) <= ratio[1] + 1e-9
    # ... and short of the drawn target by less than one block at most: on average the
    # masks cover most of the requested range's mean.
    assert float(fractions.mean()) >= 0.7 * (ratio[0] + ratio[1]) / 2


def test_each_image_is_masked_with_the_requested_probability() -> None:
    masks = BlockMasking((7, 7), probability=0.5)(2000, random.Random(1))
    masked = masks.flatten(1).any(1).float().mean().item()
    assert abs(masked - 0.5) < 4 * (0.25 / 2000) ** 0.5  # four binomial standard deviations
    assert not BlockMasking((7, 7), probability=0.0)(50, random.Random(1)).any()


def test_single_target_is_never_exceeded() -> None:
    rng = random.Random(3)
    for target in (1.0, 4.0, 9.5, 20.0, 24.5):
        for _ in range(50):
            mask = block_mask((7, 7), target, rng)
            assert mask.sum() <= target


def test_aspect_ratio_of_blocks_is_bounded() -> None:
    # Square budgets large enough for one block: its sides follow aspect in [0.3, 1/0.3].
    rng = random.Random(4)
    for _ in range(200):
        mask = block_mask((14, 14), 30.0, rng, min_block=30)
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            continue
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        if mask.sum() == height * width:  # a single block
            # rounding of sqrt(area * aspect) can stretch the ratio by one patch at most
            assert (height - 1) / (width + 1) <= 1 / 0.3 and (width - 1) / (height + 1) <= 1 / 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": (0.1, 1.0)}, "ratio"),
        ({"ratio": (-0.1, 0.5)}, "ratio"),
        ({"ratio": (0.5, 0.1)}, "ratio"),
        ({"ratio": 0.3}, "ratio"),
        ({"probability": 1.5}, "probability"),
        ({"min_aspect": 0.0}, "min_aspect"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlockMasking((7, 7), **kwargs)
