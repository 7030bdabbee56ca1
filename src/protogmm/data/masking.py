"""Block-wise patch masks for masked-image modelling (iBOT).

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), §3 and
``ImageFolderMask`` in bytedance/ibot ``loader.py``, which follows BEiT's block-wise masking
(Bao et al., ICLR 2022, ``masking_generator.py``). For one image with an ``h x w`` patch grid
and a prediction ratio ``r``:

* the target is ``r * h * w`` masked patches;
* while fewer are masked, up to 10 attempts place a rectangle: area uniform in
  ``[(min(h, w) // 3) ** 2, remaining]``, aspect ratio log-uniform in
  ``[min_aspect, 1 / min_aspect]``, ``bh = round(sqrt(area * aspect))``,
  ``bw = round(sqrt(area / aspect))``, accepted if ``bh < h`` and ``bw < w`` and it masks
  between 1 and ``remaining`` new patches; the loop stops when no attempt succeeds.

So a mask never exceeds its target, and may fall short of it by less than one block (the
algorithm's own stopping rule). iBOT's ViT recipe (``--pred_ratio 0 0.3 --pred_ratio_var 0
0.2``) draws, per image and view, ``r = 0`` (no mask) or ``r ~ U(0.1, 0.5)`` with equal
chance: ``ratio=(0.1, 0.5)``, ``probability=0.5`` here (DINOv2's ``mask_ratio_min_max`` and
``mask_sample_probability`` say the same).

Randomness comes from a ``random.Random`` the caller passes, so masks are a function of its
seed alone (the trainer seeds one per step; the global RNGs are untouched).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor

from protogmm._checks import check_in_range, check_positive_int

__all__ = ["BlockMasking", "block_mask"]

# BEiT / iBOT: attempts to place one block before giving up.
_ATTEMPTS = 10


def block_mask(
    grid: tuple[int, int],
    num_masked: float,
    rng: random.Random,
    *,
    min_aspect: float = 0.3,
    min_block: int | None = None,
) -> np.ndarray:
    """One block-wise mask with at most ``num_masked`` patches (BEiT / iBOT algorithm).

    Args:
        grid: ``(h, w)`` patches.
        num_masked: the target number of masked patches (``ratio * h * w``; may be
            fractional, as in iBOT).
        rng: the random source.
        min_aspect: the smallest block aspect ratio (the largest is its inverse); iBOT: 0.3.
        min_block: the smallest block area drawn; default ``(min(h, w) // 3) ** 2`` (iBOT).

    Returns:
        A bool ``[h, w]`` array, True where the patch is masked.
    """
    height, width = grid
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    low = (min(height, width) // 3) ** 2 if min_block is None else min_block
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        delta = 0
        for _ in range(_ATTEMPTS):
            area = rng.uniform(low, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            block_h = int(round(math.sqrt(area * aspect)))
            block_w = int(round(math.sqrt(area / aspect)))
            if block_w < width and block_h < height:
                top = rng.randint(0, height - block_h)
                left = rng.randint(0, width - block_w)
                window = mask[top : top + block_h, left : left + block_w]
                new = block_h * block_w - int(window.sum())
                if 0 < new <= remaining:
                    window[...] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


class BlockMasking:
    """iBOT's per-image block masks for a batch: ``[N, h, w]`` bool, True = masked.

    Each image is masked with probability ``probability``, with a prediction ratio drawn
    uniformly in ``ratio``; the other images get an empty mask (iBOT's ``pred_ratio 0``
    branch: their patch loss is zero, their [CLS] loss unchanged).

    Args:
        grid: ``(h, w)`` patch grid of the global views (e.g. ``(7, 7)`` for 28 px images
            and 4 px patches).
        ratio: ``(low, high)`` range of the prediction ratio, each in ``[0, 1)``; iBOT
            (0.1, 0.5).
        probability: chance that an image is masked at all, in ``[0, 1]``; iBOT 0.5.
        min_aspect: smallest block aspect ratio, in ``(0, 1]``; iBOT 0.3.

    Raises:
        ValueError: on a ratio outside ``[0, 1)`` or ``low > high``, a probability outside
            ``[0, 1]``, or a bad grid or aspect ratio; the message names the argument.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        ratio: tuple[float, float] = (0.1, 0.5),
        probability: float = 0.5,
        min_aspect: float = 0.3,
    ) -> None:
        if len(grid) != 2:
            raise ValueError(f"grid must be (h, w), got {grid!r}")
        self.grid = (check_positive_int("grid", grid[0]), check_positive_int("grid", grid[1]))
        self.ratio = check_ratio_range("ratio", ratio)
        self.probability = check_in_range("probability", probability, 0.0, 1.0)
        self.min_aspect = check_in_range("min_aspect", min_aspect, 0.0, 1.0, low_inclusive=False)

    def __call__(self, num_images: int, rng: random.Random) -> Tensor:
        """Masks for ``num_images`` images, drawn from ``rng``: ``[num_images, h, w]`` bool."""
        check_positive_int("num_images", num_images)
        num_patches = self.grid[0] * self.grid[1]
        masks = np.zeros((num_images, *self.grid), dtype=bool)
        for index in range(num_images):
            if rng.random() >= self.probability:
                continue
            target = rng.uniform(*self.ratio) * num_patches
            masks[index] = block_mask(self.grid, target, rng, min_aspect=self.min_aspect)
        return torch.from_numpy(masks)

    def __repr__(self) -> str:
        return (
            f"BlockMasking(grid={self.grid}, ratio={self.ratio}, "
            f"probability={self.probability}, min_aspect={self.min_aspect})"
        )


def check_ratio_range(name: str, ratio: object) -> tuple[float, float]:
    """Return ``ratio`` as ``(low, high)`` with ``0 <= low <= high < 1``, else raise naming it."""
    try:
        low, high = ratio  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) in [0, 1), got {ratio!r}") from None
    for value in (low, high):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a pair (low, high) in [0, 1), got {ratio!r}")
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {ratio!r}")
    return float(low), float(high)
