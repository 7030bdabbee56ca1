"""Long-tailed subsampling of any labelled dataset (the CIFAR-LT / ImageNet-LT recipe).

Class ``c`` of rank ``r(c)`` keeps ``n_c = max(1, floor(n_max * rho ** (-r / (C - 1))))``
images (:func:`protogmm.data.datasets.long_tail_counts`: truncation as in Cao et al.'s
LDAM-DRW code for CIFAR-LT, at least one per class), with ``rho`` the imbalance ratio (the
largest over the smallest count) and ``n_max`` the head class's count.

Deterministic from ``seed`` on every machine: which images a class keeps is the first
``n_c`` of its images in the order of a SplitMix64 hash of ``(seed, index)``, the fixed
integer hash :func:`protogmm.data.datasets.stratified_split` uses (NumPy's generators may
change between releases). The head class is class 0 (``class_order="index"``, as
CIFAR-LT), or the class ranks are a seeded permutation (``class_order="seeded"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.data.datasets import _splitmix64, long_tail_counts

__all__ = ["LongTailSubset", "long_tail_subset"]

ClassOrder = Literal["index", "seeded"]


@dataclass(frozen=True)
class LongTailSubset:
    """The result of :func:`long_tail_subset`.

    Attributes:
        indices: kept positions of the dataset, ascending (the dataset's own order).
        counts: kept images per class (index = class), ``counts[c] == profile[rank[c]]``.
        ranks: the rank of each class in the profile (0 = head).
        n_max: the head class's count.
        imbalance_ratio: rho.
        class_order: ``"index"`` or ``"seeded"``.
        seed: the seed.
    """

    indices: np.ndarray
    counts: list[int]
    ranks: list[int]
    n_max: int
    imbalance_ratio: float
    class_order: str
    seed: int


def _class_ranks(num_classes: int, class_order: str, seed: int) -> np.ndarray:
    if class_order == "index":
        return np.arange(num_classes)
    keys = _splitmix64(_splitmix64(np.full(num_classes, seed, dtype=np.uint64)) ^ np.uint64(1))
    keys = _splitmix64(keys ^ np.arange(num_classes, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")  # order[r] = the class of rank r
    ranks = np.empty(num_classes, dtype=np.int64)
    ranks[order] = np.arange(num_classes)
    return ranks


def _largest_n_max(available: np.ndarray, ranks: np.ndarray, rho: float) -> int:
    """The largest head count whose long-tail profile every class has the images for.

    Args:
        available: ``[C]`` images of each class (every one > 0).
        ranks: ``[C]`` the rank of each class in the profile.
        rho: the imbalance ratio.
    """
    # The counts grow with n_max, so the largest feasible n_max is found by bisection.
    low, high = 1, int(available.max())
    while low < high:
        middle = (low + high + 1) // 2
        profile = np.asarray(long_tail_counts(middle, len(available), rho))
        if np.all(profile[ranks] <= available):
            low = middle
        else:
            high = middle - 1
    return low


def _hashed_subset(
    labels: np.ndarray, available: np.ndarray, counts: np.ndarray, seed: int
) -> np.ndarray:
    """Sorted indices of the first ``counts[c]`` images of each class ``c`` in seeded hash order.

    Args:
        labels: ``[N]`` the labels.
        available: ``[C]`` images of each class (``bincount(labels)``).
        counts: ``[C]`` images to keep of each class (at most ``available``).
        seed: the seed of the hash order.
    """
    index = np.arange(len(labels), dtype=np.uint64)
    keys = _splitmix64(_splitmix64(np.full_like(index, seed)) ^ index)
    order = np.argsort(keys, kind="stable")
    # Group by class keeping the hash order inside each class (one stable sort, not a pass
    # per class: iNaturalist has 8,142 classes), then keep each class's first counts[c].
    by_class = order[np.argsort(labels[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(available)[:-1]])
    sorted_labels = labels[by_class]
    place_in_class = np.arange(len(labels)) - starts[sorted_labels]
    keep = np.zeros(len(labels), dtype=bool)
    keep[by_class[place_in_class < counts[sorted_labels]]] = True
    return np.flatnonzero(keep)


def long_tail_subset(
    labels: np.ndarray,
    imbalance_ratio: float,
    *,
    num_classes: int | None = None,
    n_max: int | None = None,
    class_order: ClassOrder = "index",
    seed: int = 0,
    class_names: list[str] | None = None,
) -> LongTailSubset:
    """Choose a long-tailed subset: class of rank ``r`` keeps ``long_tail_counts(...)[r]``.

    Args:
        labels: ``[N]`` integer labels in ``[0, num_classes)``.
        imbalance_ratio: rho >= 1 (1 keeps ``n_max`` images of every class).
        num_classes: C; default ``max(labels) + 1``.
        n_max: the head class's count; default the largest for which every class has
            enough images (for balanced data: the class size).
        class_order: ``"index"`` (class 0 is the head, class C-1 the tail) or
            ``"seeded"`` (a seeded permutation of the classes).
        seed: an integer >= 0; chooses the images kept (and the ranks when seeded).
        class_names: names used in error messages; default ``"class c"``.

    Returns:
        A :class:`LongTailSubset` whose ``indices`` select the subset.

    Raises:
        ValueError: naming the argument on a bad value, or naming the class whose images
            are too few for the profile asked for.
    """
    rho = check_in_range("imbalance_ratio", imbalance_ratio, 1.0, math.inf)
    check_choice("class_order", class_order, ("index", "seeded"))
    check_positive_int("seed", seed, minimum=0)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got a label {labels.min()}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    check_positive_int("num_classes", num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {labels.max()}")

    def name(c: int) -> str:
        return repr(class_names[c]) if class_names is not None else f"class {c}"

    available = np.bincount(labels, minlength=num_classes)
    ranks = _class_ranks(num_classes, class_order, seed)
    if n_max is None:
        empty = np.flatnonzero(available == 0)
        if len(empty):
            raise ValueError(f"{name(int(empty[0]))} has no images to subsample")
        n_max = _largest_n_max(available, ranks, rho)
    check_positive_int("n_max", n_max)
    counts = np.asarray(long_tail_counts(n_max, num_classes, rho))[ranks]
    short = np.flatnonzero(counts > available)
    if len(short):
        c = int(short[0])
        raise ValueError(
            f"{name(c)} has {available[c]} images, the long-tail profile asks for {counts[c]} "
            f"(n_max={n_max}, imbalance_ratio={rho:g}); lower n_max or leave it unset"
        )

    return LongTailSubset(
        indices=_hashed_subset(labels, available, counts, seed),
        counts=counts.tolist(),
        ranks=ranks.tolist(),
        n_max=int(n_max),
        imbalance_ratio=rho,
        class_order=class_order,
        seed=seed,
    )
