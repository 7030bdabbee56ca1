"""Long-tailed subsampling: counts follow n_c = n_max * rho^(-c/(C-1)) exactly, seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protogmm.data import EmbeddedMNIST, LabelledSubset, long_tail_counts, long_tail_subset


def formula(n_max: int, num_classes: int, rho: float) -> list[int]:
    """The documented rule, written out: floor, at least one."""
    return [
        max(1, math.floor(n_max * rho ** (-c / (num_classes - 1)) + 1e-9))
        for c in range(num_classes)
    ]


@pytest.mark.parametrize(
    ("n_max", "num_classes", "rho"), [(400, 10, 10.0), (400, 10, 100.0), (50, 7, 3.0), (9, 5, 50.0)]
)
def test_counts_follow_the_formula_exactly(n_max: int, num_classes: int, rho: float) -> None:
    labels = np.repeat(np.arange(num_classes), n_max)
    subset = long_tail_subset(labels, rho, n_max=n_max)
    expected = formula(n_max, num_classes, rho)
    assert subset.counts == expected == long_tail_counts(n_max, num_classes, rho)
    assert np.bincount(labels[subset.indices], minlength=num_classes).tolist() == expected
    assert subset.n_max == n_max and subset.ranks == list(range(num_classes))


def test_mnist5k_rho_10_by_hand() -> None:
    # 400 * 10^(-c/9): 400, 309.71, 239.79, 185.66, 143.75, 111.30, 86.18, 66.72, 51.66, 40.
    train = EmbeddedMNIST("train")
    subset = long_tail_subset(train.labels, 10.0)
    assert subset.n_max == 400  # the default: the class size of balanced data
    assert subset.counts == [400, 309, 239, 185, 143, 111, 86, 66, 51, 40]
    kept = LabelledSubset(train, subset.indices)
    assert np.bincount(kept.labels).tolist() == subset.counts
    assert np.all(np.diff(subset.indices) > 0)  # ascending: the dataset's own order


def test_default_n_max_is_the_largest_the_data_allows() -> None:
    # Class 2 has only 12 images; with rho = 4 over 3 classes it needs n_max / 4 <= 12.
    labels = np.repeat(np.arange(3), [100, 100, 12])
    subset = long_tail_subset(labels, 4.0)
    assert subset.n_max == 51  # 51 / 4 = 12.75 -> 12; 52 / 4 = 13 > 12
    assert subset.counts == [51, 25, 12]


def test_seed_picks_the_images_and_is_deterministic() -> None:
    labels = np.repeat(np.arange(4), 30)
    a = long_tail_subset(labels, 5.0, seed=0)
    b = long_tail_subset(labels, 5.0, seed=0)
    c = long_tail_subset(labels, 5.0, seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.counts == c.counts and not np.array_equal(a.indices, c.indices)
    # Pinned: a fixed integer hash, identical on every machine and NumPy version.
    assert a.counts == [30, 17, 10, 6]
    assert a.indices[30:36].tolist() == [31, 33, 35, 36, 38, 39]  # class 1's first kept
    assert a.indices[-5:].tolist() == [95, 111, 113, 115, 116] and len(a.indices) == 63


def test_seeded_class_order_permutes_the_head() -> None:
    labels = np.repeat(np.arange(6), 20)
    subset = long_tail_subset(labels, 10.0, class_order="seeded", seed=3)
    assert sorted(subset.ranks) == list(range(6)) and subset.ranks != list(range(6))
    profile = long_tail_counts(20, 6, 10.0)
    assert subset.counts == [profile[r] for r in subset.ranks]
    assert np.bincount(labels[subset.indices]).tolist() == subset.counts
    assert subset.ranks == [3, 1, 5, 4, 2, 0]  # pinned (fixed integer hash)


def test_rho_one_keeps_n_max_of_every_class() -> None:
    labels = np.repeat(np.arange(3), [5, 9, 7])
    assert long_tail_subset(labels, 1.0).counts == [5, 5, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"class_order": "random"}, "class_order"),
        ({"seed": -1}, "seed"),
        ({"n_max": 0}, "n_max"),
        ({"n_max": 25}, "'b' has 20 images, the long-tail profile asks for 25"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs: dict, message: str) -> None:
    labels = np.repeat(np.arange(2), [30, 20])
    args = {"imbalance_ratio": 1.0, "class_names": ["a", "b"]} | kwargs
    with pytest.raises(ValueError, match=message):
        long_tail_subset(labels, **args)


def test_a_class_without_images_is_named() -> None:
    with pytest.raises(ValueError, match="class 1 has no images"):
        long_tail_subset(np.array([0, 0, 2, 2]), 2.0)
