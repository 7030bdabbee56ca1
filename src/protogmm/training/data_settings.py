"""The data module's arguments: the dataset names, and the checks every argument passes.

:func:`check_data_settings` turns a bad ``--data.*`` value into a one-line error naming the
key before anything is read from disk, and resolves the image size and channels a dataset
defaults to (:class:`protogmm.training.datamodule.SSLDataModule`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.evaluation.longtail import frequency_groups

DatasetName = Literal["mnist5k", "synthetic", "folder", "cifar10", "cifar100"]
DATASETS: tuple[str, ...] = ("mnist5k", "synthetic", "folder", "cifar10", "cifar100")
#: The datasets read from files under ``data.root``.
FILE_DATASETS = ("folder", "cifar10", "cifar100")


def check_data_settings(hp: Mapping[str, Any]) -> tuple[int, int]:
    """Check the data module's arguments, as passed (``None`` where left to the dataset).

    Args:
        hp: every argument of :class:`~protogmm.training.datamodule.SSLDataModule`, by name.

    Returns:
        ``(image_size, in_channels)``, resolved: the dataset's own where not given (28
        MNIST-5k, ``synthetic_image_size``, 32 CIFAR; 1 channel for MNIST-5k and synthetic,
        3 for CIFAR and folders).

    Raises:
        ValueError: one line naming the first bad ``data.*`` value.
        FileNotFoundError: ``data.root`` of a file dataset is not a folder.
    """
    _check_sizes_and_ratios(hp)
    _check_images_and_root(hp)
    _check_longtail_thresholds(hp["longtail_thresholds"], hp["longtail_thresholds_relative"])
    return _image_geometry(hp)


def _check_sizes_and_ratios(hp: Mapping[str, Any]) -> None:
    check_choice("data.dataset", hp["dataset"], DATASETS)
    check_positive_int("data.batch_size", hp["batch_size"])
    check_positive_int("data.num_workers", hp["num_workers"], minimum=0)
    check_positive_int("data.num_local_crops", hp["num_local_crops"], minimum=0)
    check_positive_int("data.max_train_samples", hp["max_train_samples"], minimum=0)
    check_positive_int("data.knn_train_samples", hp["knn_train_samples"], minimum=0)
    check_positive_int("data.knn_test_samples", hp["knn_test_samples"], minimum=0)
    check_in_range("data.synthetic_imbalance_ratio", hp["synthetic_imbalance_ratio"], 1.0, 1e6)
    check_positive_int("data.synthetic_classes", hp["synthetic_classes"])
    # The held-out split draws half as many images, and each split needs every class once.
    check_positive_int(
        "data.synthetic_samples", hp["synthetic_samples"], minimum=2 * hp["synthetic_classes"]
    )
    check_positive_int("data.seed", hp["seed"], minimum=0)
    check_in_range(
        "data.test_fraction",
        hp["test_fraction"],
        0.0,
        1.0,
        low_inclusive=False,
        high_inclusive=False,
    )
    check_in_range("data.imbalance_ratio", hp["imbalance_ratio"], 1.0, 1e6)
    if hp["imbalance_n_max"] is not None:
        check_positive_int("data.imbalance_n_max", hp["imbalance_n_max"])
    check_choice("data.imbalance_class_order", hp["imbalance_class_order"], ("index", "seeded"))


def _check_images_and_root(hp: Mapping[str, Any]) -> None:
    check_choice("data.on_bad_image", hp["on_bad_image"], ("error", "skip"))
    if not isinstance(hp["scan_images"], bool):
        raise ValueError(f"data.scan_images must be true or false, got {hp['scan_images']!r}")
    if hp["max_image_pixels"] is not None:
        check_positive_int("data.max_image_pixels", hp["max_image_pixels"])
    dataset, root = hp["dataset"], hp["root"]
    if dataset in FILE_DATASETS:
        if not root:
            raise ValueError(f"data.root is required for data.dataset={dataset!r}")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root: folder not found: {root}")


def _check_longtail_thresholds(thresholds: Any, relative: bool) -> None:
    if len(tuple(thresholds)) != 2:
        raise ValueError(f"data.longtail_thresholds must be a pair (many, few), got {thresholds!r}")
    try:
        frequency_groups([1], *thresholds, relative=relative)  # validates the pair
    except ValueError as error:
        raise ValueError(f"data.longtail_thresholds: {error}") from None


def _image_geometry(hp: Mapping[str, Any]) -> tuple[int, int]:
    """``(image_size, in_channels)``: as given, or the dataset's own."""
    dataset, image_size, in_channels = hp["dataset"], hp["image_size"], hp["in_channels"]
    native_size = {"mnist5k": 28, "synthetic": hp["synthetic_image_size"]}.get(dataset, 32)
    if image_size is None and dataset == "folder":
        raise ValueError(
            "data.image_size is required for data.dataset='folder' (e.g. 224 for "
            "ImageNet-style photos, 32 for CIFAR-sized images)"
        )
    native_channels = 1 if dataset in ("mnist5k", "synthetic") else 3
    image_size = native_size if image_size is None else image_size
    in_channels = native_channels if in_channels is None else in_channels
    check_positive_int("data.image_size", image_size, minimum=8)
    if isinstance(in_channels, bool) or in_channels not in (1, 3):
        raise ValueError(f"data.in_channels must be 1 or 3, got {in_channels!r}")
    return image_size, in_channels
