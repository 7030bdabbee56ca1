"""The data module's arguments: the dataset names, the option groups, and their checks.

The flat ``--data.*`` keys (dataset, batch size, crops, seed, root, image geometry) are
checked by :func:`check_data_settings`; the rest come in small typed groups, each checked
where its value is made (``__post_init__``), so a bad value is a one-line error naming its
full key (``data.synthetic.samples``) before anything is read from disk:

- :class:`SyntheticData` (``data.synthetic.*``): the synthetic dataset;
- :class:`Imbalance` (``data.imbalance.*``): the long-tail subsampling of the training split;
- :class:`ImageReading` (``data.images.*``): unreadable and oversized image files;
- :class:`LongTailGroups` (``data.longtail.*``): the run report's frequency groups;
- :class:`KnnBank` (``data.knn.*``): the k-NN monitor's bank and queries.

On the command line and in YAML a group's options are nested keys
(``--data.synthetic.samples 64``, or ``synthetic: {samples: 64}`` under ``data``); Python
callers pass the group's value or a mapping of its options. The flat keys of before the
groups (``synthetic_samples``) are rewritten by
:func:`protogmm.training.legacy_hparams.upgrade_data_hparams`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from protogmm._checks import check_choice, check_in_range, check_positive_int, options_from
from protogmm.data import MAX_IMAGE_PIXELS
from protogmm.evaluation.longtail import frequency_groups

DatasetName = Literal["mnist5k", "synthetic", "folder", "cifar10", "cifar100"]
DATASETS: tuple[str, ...] = ("mnist5k", "synthetic", "folder", "cifar10", "cifar100")
#: The datasets read from files under ``data.root``.
FILE_DATASETS = ("folder", "cifar10", "cifar100")


@dataclass(frozen=True)
class SyntheticData:
    """The synthetic dataset (``data.dataset=synthetic``): Gaussian-blob images.

    Args:
        samples: training images (the held-out split draws half as many).
        classes: classes.
        image_size: image side in pixels (the data module's default ``image_size``).
        imbalance_ratio: long-tail ratio rho >= 1 of the class profile.
    """

    KEY: ClassVar[str] = "data.synthetic"
    samples: int = 512
    classes: int = 10
    image_size: int = 16
    imbalance_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int(f"{self.KEY}.classes", self.classes)
        # The held-out split draws half as many images, and each split needs every class once.
        check_positive_int(f"{self.KEY}.samples", self.samples, minimum=2 * self.classes)
        check_positive_int(f"{self.KEY}.image_size", self.image_size)
        check_in_range(f"{self.KEY}.imbalance_ratio", self.imbalance_ratio, 1.0, 1e6)


@dataclass(frozen=True)
class Imbalance:
    """Long-tail subsampling of the training split (:func:`protogmm.data.long_tail_subset`).

    Args:
        ratio: rho >= 1; above 1 the training split is subsampled to
            ``n_c = n_max * rho ** (-c / (C - 1))`` images per class (1: unchanged).
        n_max: the head class's count; default the largest the data allows.
        class_order: ``"index"`` (class 0 is the head) or ``"seeded"``.
    """

    KEY: ClassVar[str] = "data.imbalance"
    ratio: float = 1.0
    n_max: int | None = None
    class_order: Literal["index", "seeded"] = "index"

    def __post_init__(self) -> None:
        check_in_range(f"{self.KEY}.ratio", self.ratio, 1.0, 1e6)
        if self.n_max is not None:
            check_positive_int(f"{self.KEY}.n_max", self.n_max)
        check_choice(f"{self.KEY}.class_order", self.class_order, ("index", "seeded"))

    @property
    def active(self) -> bool:
        """Whether the training split is subsampled at all."""
        return self.ratio > 1.0 or self.n_max is not None


@dataclass(frozen=True)
class ImageReading:
    """Unreadable and oversized image files (``folder``; see :mod:`protogmm.data.bad_images`).

    Args:
        on_bad: ``"error"`` (stop, naming the file) or ``"skip"`` (count, log, report, and
            never shift a label).
        scan: decode every image once before training: with ``error`` the first bad file
            and the count are reported before any step; with ``skip`` the bad files are
            dropped from the index.
        max_pixels: a file whose header declares more pixels is a bad image before anything
            is decoded (decompression bombs); ``null``: no limit.
    """

    KEY: ClassVar[str] = "data.images"
    on_bad: Literal["error", "skip"] = "error"
    scan: bool = False
    max_pixels: int | None = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        check_choice(f"{self.KEY}.on_bad", self.on_bad, ("error", "skip"))
        if not isinstance(self.scan, bool):
            raise ValueError(f"{self.KEY}.scan must be true or false, got {self.scan!r}")
        if self.max_pixels is not None:
            check_positive_int(f"{self.KEY}.max_pixels", self.max_pixels)


@dataclass(frozen=True)
class LongTailGroups:
    """The run report's frequency groups (:func:`protogmm.evaluation.frequency_groups`).

    Args:
        thresholds: ``(many, few)``: classes with more than ``many`` training images are the
            head, fewer than ``few`` the tail.
        relative: the thresholds are fractions of the largest class's count (for small
            data, see :mod:`protogmm.evaluation.longtail`).
    """

    KEY: ClassVar[str] = "data.longtail"
    thresholds: tuple[float, float] = (100.0, 20.0)
    relative: bool = False

    def __post_init__(self) -> None:
        # A list from YAML or a mapping is kept as the tuple checkpoints have always held.
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        if len(self.thresholds) != 2:
            raise ValueError(
                f"{self.KEY}.thresholds must be a pair (many, few), got {self.thresholds!r}"
            )
        if not isinstance(self.relative, bool):
            raise ValueError(f"{self.KEY}.relative must be true or false, got {self.relative!r}")
        try:
            frequency_groups([1], *self.thresholds, relative=self.relative)  # checks the pair
        except ValueError as error:
            raise ValueError(f"{self.KEY}.thresholds: {error}") from None


@dataclass(frozen=True)
class KnnBank:
    """The k-NN bank and queries (monitor, ``eval``, long-tail report).

    Args:
        train_samples: at most this many training images, a seeded random subset (0: all).
            It bounds the monitor's memory and time whatever the data set's size (DINO's
            full ImageNet bank is 1.28 M features, and its raw-pixel baseline 770 GB at
            224 px).
        test_samples: at most this many held-out images are classified (0: all).
    """

    KEY: ClassVar[str] = "data.knn"
    train_samples: int = 20000
    test_samples: int = 5000

    def __post_init__(self) -> None:
        check_positive_int(f"{self.KEY}.train_samples", self.train_samples, minimum=0)
        check_positive_int(f"{self.KEY}.test_samples", self.test_samples, minimum=0)


#: The option groups of the data module, by argument name.
DATA_GROUPS: dict[str, type] = {
    "synthetic": SyntheticData,
    "imbalance": Imbalance,
    "images": ImageReading,
    "longtail": LongTailGroups,
    "knn": KnnBank,
}

Group = TypeVar("Group")


def group_value(cls: type[Group], value: Group | Mapping[str, Any] | None) -> Group:
    """A group's value from itself, a mapping of its options (those that differ from the
    defaults are enough) or None (the defaults).

    Raises:
        ValueError: one line naming an unknown option (listing the known ones), or the first
            bad value (from the group's own checks).
    """
    return options_from(cls, value, cls.KEY)  # type: ignore[attr-defined]


def plain_group(value: Any) -> dict[str, Any]:
    """A group's options as a plain mapping (what checkpoints and ``hparams.yaml`` hold)."""
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}


def check_data_settings(hp: Mapping[str, Any]) -> tuple[int, int]:
    """Check the data module's flat arguments, as passed (``None`` where left to the dataset).

    The groups check themselves when they are made (see the module docstring).

    Args:
        hp: every argument of :class:`~protogmm.training.datamodule.SSLDataModule`, by name,
            the groups as plain mappings (:func:`plain_group`).

    Returns:
        ``(image_size, in_channels)``, resolved: the dataset's own where not given (28
        MNIST-5k, ``data.synthetic.image_size``, 32 CIFAR; 1 channel for MNIST-5k and
        synthetic, 3 for CIFAR and folders).

    Raises:
        ValueError: one line naming the first bad ``data.*`` value.
        FileNotFoundError: ``data.root`` of a file dataset is not a folder.
    """
    _check_sizes(hp)
    _check_root(hp["dataset"], hp["root"])
    return _image_geometry(hp)


def _check_sizes(hp: Mapping[str, Any]) -> None:
    check_choice("data.dataset", hp["dataset"], DATASETS)
    check_positive_int("data.batch_size", hp["batch_size"])
    check_positive_int("data.num_workers", hp["num_workers"], minimum=0)
    check_positive_int("data.num_local_crops", hp["num_local_crops"], minimum=0)
    check_positive_int("data.max_train_samples", hp["max_train_samples"], minimum=0)
    check_positive_int("data.seed", hp["seed"], minimum=0)
    check_in_range(
        "data.test_fraction",
        hp["test_fraction"],
        0.0,
        1.0,
        low_inclusive=False,
        high_inclusive=False,
    )


def _check_root(dataset: str, root: str | None) -> None:
    if dataset in FILE_DATASETS:
        if not root:
            raise ValueError(f"data.root is required for data.dataset={dataset!r}")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root: folder not found: {root}")


def _image_geometry(hp: Mapping[str, Any]) -> tuple[int, int]:
    """``(image_size, in_channels)``: as given, or the dataset's own."""
    dataset, image_size, in_channels = hp["dataset"], hp["image_size"], hp["in_channels"]
    native_size = {"mnist5k": 28, "synthetic": hp["synthetic"]["image_size"]}.get(dataset, 32)
    if image_size is None and dataset == "folder":
        raise ValueError(
            "data.image_size is required for data.dataset='folder' (e.g. 224 for "
            "ImageNet-style photos, 32 for CIFAR-sized images)"
        )
    native_channels = 1 if dataset in ("mnist5k", "synthetic") else 3
    # A synthetic image too small for the crops names the key that made it.
    size_key = "data.synthetic.image_size" if image_size is None else "data.image_size"
    image_size = native_size if image_size is None else image_size
    in_channels = native_channels if in_channels is None else in_channels
    check_positive_int(size_key, image_size, minimum=8)
    if isinstance(in_channels, bool) or in_channels not in (1, 3):
        raise ValueError(f"data.in_channels must be 1 or 3, got {in_channels!r}")
    return image_size, in_channels
