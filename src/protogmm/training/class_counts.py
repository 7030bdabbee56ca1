"""What the data module records of its classes: per-class counts and the long-tail recipe.

``class_counts.json`` (written by :class:`protogmm.training.run_report.RunReport` before the
first step) says what a run trained on: the training split's per-class counts after
long-tail subsampling and dropped files, the held-out counts, the frequency groups and the
long-tail formula with its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protogmm.data.longtail import LongTailSubset
from protogmm.evaluation.longtail import FrequencyGroups

#: How a long-tailed training split was drawn (:func:`protogmm.data.long_tail_subset`).
LONG_TAIL_FORMULA = "n_c = max(1, floor(n_max * rho ** (-rank_c / (C - 1))))"


def class_counts(dataset: Any, num_classes: int | None = None) -> list[int]:
    """Images per class of a labelled dataset (``num_classes``: default its own classes)."""
    minlength = len(dataset.classes) if num_classes is None else num_classes
    return np.bincount(dataset.labels, minlength=minlength).tolist()


def class_counts_json(
    hp: Mapping[str, Any],
    train: Any,
    test: Any,
    *,
    groups: FrequencyGroups,
    long_tail: LongTailSubset | None,
    pretraining_labels: np.ndarray | None,
) -> dict[str, Any]:
    """What ``class_counts.json`` holds.

    Args:
        hp: the data module's hyperparameters.
        train: the labelled training split (long-tailed if asked, bad files left out).
        test: the labelled held-out split.
        groups: the training classes' frequency groups.
        long_tail: the long-tail subsampling, if any.
        pretraining_labels: the labels of the images pretrained on (set up data only;
            recorded when ``max_train_samples`` keeps a prefix of the training split).
    """
    record: dict[str, Any] = {
        "dataset": hp["dataset"],
        "root": hp["root"],
        "classes": [str(name) for name in train.classes],
        "counts": class_counts(train),
        "total": len(train),
        "held_out_counts": class_counts(test, len(train.classes)),
        "long_tail": None,
        "frequency_groups": groups.as_dict(),
    }
    if long_tail is not None:
        record["long_tail"] = {
            "formula": LONG_TAIL_FORMULA,
            "imbalance_ratio": long_tail.imbalance_ratio,
            "n_max": long_tail.n_max,
            "class_order": long_tail.class_order,
            "ranks": long_tail.ranks,
            "seed": long_tail.seed,
        }
    if pretraining_labels is not None and hp["max_train_samples"]:
        record["pretraining_counts"] = np.bincount(
            pretraining_labels, minlength=len(train.classes)
        ).tolist()
    return record
