"""The labelled train and held-out splits of each dataset, untransformed, before subsampling.

Datasets (``data.dataset``): ``mnist5k`` (split by ``test_fraction``), ``synthetic`` (the
held-out split a second draw of the same class templates), ``cifar10`` / ``cifar100`` (the
official split) and ``folder`` (``root/train`` + ``root/val`` or ``root/test``, or one
folder split by class); see :mod:`protogmm.training.datamodule`. Folder images are scanned
here when ``data.images.scan`` is on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protogmm.data import (
    CIFARImages,
    ClassFolderImages,
    EmbeddedMNIST,
    LabelledSubset,
    SyntheticImages,
    check_same_classes,
    drop_bad_images,
    hash_order,
    scan_images,
    stratified_split,
)

_HELD_OUT_FOLDERS = ("val", "test")

logger = logging.getLogger("protogmm.data")


def base_splits(
    hp: Mapping[str, Any], in_channels: int, scan_skipped: dict[str, list[str]]
) -> dict[str, Any]:
    """The labelled ``"train"`` and ``"test"`` datasets of ``hp["dataset"]``.

    Args:
        hp: the data module's hyperparameters (its groups as plain mappings).
        in_channels: the resolved channels (images are converted to it).
        scan_skipped: receives, by split, the paths a scan left out (``folder`` with
            ``images.scan`` and ``images.on_bad="skip"``).
    """
    if hp["dataset"] == "mnist5k":
        return {
            split: EmbeddedMNIST(split=split, test_fraction=hp["test_fraction"], seed=hp["seed"])
            for split in ("train", "test")
        }
    if hp["dataset"] == "synthetic":
        # The synthetic "test" split is a second draw of the same class templates.
        synthetic = hp["synthetic"]
        return {
            split: SyntheticImages(
                num_samples=synthetic["samples"] if split == "train" else synthetic["samples"] // 2,
                num_classes=synthetic["classes"],
                image_size=synthetic["image_size"],
                in_channels=in_channels,
                imbalance_ratio=synthetic["imbalance_ratio"],
                seed=hp["seed"],
                sample_seed=hp["seed"] + (0 if split == "train" else 1),
            )
            for split in ("train", "test")
        }
    if hp["dataset"] in ("cifar10", "cifar100"):
        return {
            split: CIFARImages(hp["root"], split=split, variant=hp["dataset"])
            for split in ("train", "test")
        }
    return folder_splits(Path(hp["root"]), hp, in_channels, scan_skipped)


def folder_splits(
    root: Path, hp: Mapping[str, Any], in_channels: int, scan_skipped: dict[str, list[str]]
) -> dict[str, Any]:
    """``root/train`` + ``root/val`` (or ``test``), or one folder split by class."""
    held_out = next((root / n for n in _HELD_OUT_FOLDERS if (root / n).is_dir()), None)

    def listed(folder: Path, split: str) -> Any:
        max_pixels = hp["images"]["max_pixels"]
        images = ClassFolderImages(folder, in_channels, max_image_pixels=max_pixels)
        return scanned(images, split, hp, scan_skipped)

    if (root / "train").is_dir():
        if held_out is None:
            raise FileNotFoundError(
                f"{root / 'train'} found but no {root / 'val'} or {root / 'test'}: add the "
                f"held-out split, or set data.root={root / 'train'} to split it by class"
            )
        train = listed(root / "train", "train")
        test = listed(held_out, "test")
        check_same_classes(train.classes, str(root / "train"), test.classes, str(held_out))
        # Interleave the classes (files are listed class by class), so that a prefix
        # (max_train_samples) is a sample of every class.
        return {
            "train": LabelledSubset(train, hash_order(len(train), hp["seed"])),
            "test": test,
        }
    full = listed(root, "all")
    train_idx, test_idx = stratified_split(full.labels, hp["test_fraction"], hp["seed"])
    return {"train": LabelledSubset(full, train_idx), "test": LabelledSubset(full, test_idx)}


def scanned(
    dataset: ClassFolderImages,
    split: str,
    hp: Mapping[str, Any],
    scan_skipped: dict[str, list[str]],
) -> Any:
    """``dataset``, scanned first when ``images.scan`` is on (bad files: error or drop)."""
    if not hp["images"]["scan"]:
        return dataset
    bad = scan_images(dataset)
    if not bad:
        return dataset
    if hp["images"]["on_bad"] == "error":
        raise ValueError(
            f"data.images.scan: {len(bad)} unreadable image file(s) among {len(dataset)} "
            f"in {dataset.root}; first: {bad[0].reason}. Remove or replace them, or set "
            "data.images.on_bad=skip"
        )
    logger.warning(
        "data.images.scan: leaving out %d unreadable image file(s) in %s (first: %s)",
        len(bad),
        dataset.root,
        bad[0].reason,
    )
    scan_skipped[split] = [b.path for b in bad]
    return LabelledSubset(dataset, drop_bad_images(dataset, bad))
