"""Head / medium / tail analysis: accuracy and prototype diversity per frequency group.

Classes are split by their number of *training* images, as in the long-tail literature
(Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019, for
ImageNet-LT and Places-LT; used for iNaturalist 2018 as well):

- ``many`` (head): more than ``many_threshold`` images (default 100);
- ``medium``: from ``few_threshold`` to ``many_threshold`` images (default 20 to 100);
- ``few`` (tail): fewer than ``few_threshold`` images (default 20).

Those numbers suit collections whose largest classes have about a thousand images
(ImageNet-LT: 1,280, iNaturalist 2018: 1,000). For small data, give the thresholds as
fractions of the largest class's count (``relative=True``): ``(0.2, 0.04)`` is
CIFAR-100-LT's 100 / 20 over its 500-image head class; ``(rho ** (-1/3), rho ** (-2/3))``
cuts an exponential profile of ratio rho into three equal bands of log-frequency (what
``benchmarks/longtail.py`` uses on MNIST-5k, where rho = 10 leaves no class below 20).

Per group this module reports the k-NN and linear-probe accuracy on held-out samples whose
true class is in the group (:mod:`protogmm.evaluation.knn`, :mod:`.linear`), and the
number of distinct prototypes the group's training samples are assigned to (argmax of the
cosine scores), raw and per class and per sample of the group: the paper's "prototype
diversity across head, medium and tail classes" (a collapsed prototype set serves the tail
with the few prototypes the head left over).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from protogmm._checks import check_in_range, check_labels
from protogmm.evaluation.features import extract_features
from protogmm.evaluation.knn import knn_classify
from protogmm.evaluation.linear import linear_probe

__all__ = [
    "GROUPS",
    "FrequencyGroups",
    "evaluate_long_tail",
    "frequency_groups",
    "group_accuracy",
    "knn_group_accuracy",
    "linear_group_accuracy",
    "longtail_markdown",
    "prototype_diversity",
]

#: Group names, head first.
GROUPS = ("many", "medium", "few")


@dataclass(frozen=True)
class FrequencyGroups:
    """Classes split by training frequency (see :func:`frequency_groups`).

    Attributes:
        class_counts: training images per class.
        many_threshold: a class with more images than this is ``many`` (absolute count).
        few_threshold: a class with fewer images than this is ``few`` (absolute count).
        members: group name -> its classes, ascending.
    """

    class_counts: tuple[int, ...]
    many_threshold: float
    few_threshold: float
    members: dict[str, list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def group_index(self) -> Tensor:
        """``[C]`` int64: the position in :data:`GROUPS` of each class's group."""
        index = torch.empty(self.num_classes, dtype=torch.long)
        for g, name in enumerate(GROUPS):
            index[self.members[name]] = g
        return index

    def non_empty(self) -> list[str]:
        """The groups holding at least one class, head first."""
        return [name for name in GROUPS if self.members[name]]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (thresholds, classes and training images per group)."""
        return {
            "many_threshold": self.many_threshold,
            "few_threshold": self.few_threshold,
            "groups": {
                name: {
                    "classes": list(self.members[name]),
                    "train_images": int(sum(self.class_counts[c] for c in self.members[name])),
                }
                for name in GROUPS
            },
        }


def frequency_groups(
    class_counts: Sequence[int],
    many_threshold: float = 100.0,
    few_threshold: float = 20.0,
    *,
    relative: bool = False,
) -> FrequencyGroups:
    """Split classes into many (> many), medium (few .. many) and few (< few) by count.

    Args:
        class_counts: training images per class (index = class), each >= 0.
        many_threshold: the head's lower bound (exclusive).
        few_threshold: the tail's upper bound (exclusive); <= ``many_threshold``.
        relative: the thresholds are fractions of ``max(class_counts)`` (for small data).

    Returns:
        The :class:`FrequencyGroups`, with absolute thresholds.

    Example:
        ``frequency_groups([500, 101, 100, 20, 19, 1]).members ==
        {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}``.

    Raises:
        ValueError: naming the argument: counts not non-negative integers or empty,
            negative or non-finite thresholds, ``few_threshold > many_threshold``.
    """
    counts = [int(c) for c in class_counts]
    exact = all(c == v for c, v in zip(counts, class_counts, strict=True))
    if not counts or not exact or any(c < 0 for c in counts):
        raise ValueError(f"class_counts must be non-negative integers, got {list(class_counts)!r}")
    many = check_in_range("many_threshold", many_threshold, 0.0, math.inf)
    few = check_in_range("few_threshold", few_threshold, 0.0, math.inf)
    if few > many:
        raise ValueError(
            f"few_threshold must be <= many_threshold={many_threshold!r}, got {few_threshold!r}"
        )
    if relative:
        many, few = many * max(counts), few * max(counts)
    members: dict[str, list[int]] = {name: [] for name in GROUPS}
    for c, n in enumerate(counts):
        members["many" if n > many else "few" if n < few else "medium"].append(c)
    return FrequencyGroups(tuple(counts), many, few, members)


def _check_class_labels(name: str, labels: Tensor, num_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (the classes of the groups), got values "
            f"from {int(labels.min())} to {int(labels.max())}"
        )


def group_accuracy(
    predictions: Tensor, labels: Tensor, groups: FrequencyGroups
) -> dict[str, float | None]:
    """Top-1 accuracy over the samples whose true class is in each group, and over all.

    Returns:
        ``{"many": a, "medium": a, "few": a, "all": a}``; ``None`` for a group without
        samples.
    """
    check_labels("labels", labels, predictions.shape[0], "predictions")
    _check_class_labels("labels", labels, groups.num_classes)
    correct = predictions.cpu().long() == labels.cpu().long()
    sample_group = groups.group_index()[labels.cpu().long()]
    result: dict[str, float | None] = {}
    for g, name in enumerate(GROUPS):
        mask = sample_group == g
        result[name] = float(correct[mask].double().mean()) if bool(mask.any()) else None
    result["all"] = float(correct.double().mean()) if len(correct) else None
    return result


def knn_group_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    groups: FrequencyGroups,
    **knn_options: Any,
) -> dict[str, float | None]:
    """Per-group accuracy of the weighted k-NN (:func:`protogmm.evaluation.knn_classify`).

    The vote runs over all classes (one classifier); only the scoring is split by group.

    Args:
        knn_options: passed to ``knn_classify`` (``k``, ``temperature``, ``chunk_size``;
            its defaults are DINO's protocol, ``k=20, temperature=0.07``).
    """
    _check_class_labels("train_labels", train_labels, groups.num_classes)
    predictions = knn_classify(
        train_features, train_labels, test_features, num_classes=groups.num_classes, **knn_options
    )
    return group_accuracy(predictions, test_labels, groups)


def linear_group_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    groups: FrequencyGroups,
    **probe_kwargs: Any,
) -> dict[str, float | None]:
    """Per-group accuracy of one linear probe (:func:`protogmm.evaluation.linear_probe`).

    ``linear_probe`` returns an accuracy, not predictions, so it is called once per
    non-empty group on that group's test samples. Its training depends only on the train
    features, labels, ``num_classes`` (fixed here to the groups' C) and seed, so every call
    trains the same classifier; ``"all"`` is the sample-weighted mean of the groups, which
    is that classifier's accuracy on all test samples.

    Args:
        probe_kwargs: passed to ``linear_probe`` (``epochs``, ``lr``, ``seed``, ...).
    """
    check_labels("test_labels", test_labels, test_features.shape[0], "test_features")
    _check_class_labels("train_labels", train_labels, groups.num_classes)
    _check_class_labels("test_labels", test_labels, groups.num_classes)
    sample_group = groups.group_index()[test_labels.cpu().long()]
    result: dict[str, float | None] = {}
    correct, total = 0, 0
    for g, name in enumerate(GROUPS):
        mask = sample_group == g
        count = int(mask.sum())
        if count == 0:
            result[name] = None
            continue
        mask = mask.to(test_features.device)
        accuracy = linear_probe(
            train_features,
            train_labels,
            test_features[mask],
            test_labels[mask.to(test_labels.device)],
            num_classes=groups.num_classes,
            **probe_kwargs,
        )
        result[name] = accuracy
        correct += round(accuracy * count)
        total += count
    result["all"] = correct / total if total else None
    return result


def prototype_diversity(
    assignments: Tensor, labels: Tensor, groups: FrequencyGroups
) -> dict[str, dict[str, float | int | None]]:
    """Distinct prototypes the samples of each group are assigned to.

    Args:
        assignments: ``[N]`` the prototype index of each sample (argmax of its scores).
        labels: ``[N]`` the samples' classes.
        groups: the frequency groups.

    Returns:
        Per group and ``"all"``: ``classes`` and ``samples`` (the group's size),
        ``distinct`` (prototypes used by its samples), ``per_class`` (distinct / classes)
        and ``per_sample`` (distinct / samples); the ratios are ``None`` for an empty group.
    """
    check_labels("assignments", assignments, labels.shape[0], "labels")
    check_labels("labels", labels, assignments.shape[0], "assignments")
    _check_class_labels("labels", labels, groups.num_classes)
    assignments, labels = assignments.cpu().long(), labels.cpu().long()
    sample_group = groups.group_index()[labels]

    def describe(chosen: Tensor, num_classes: int) -> dict[str, float | int | None]:
        distinct = int(chosen.unique().numel())
        samples = int(chosen.numel())
        return {
            "classes": num_classes,
            "samples": samples,
            "distinct": distinct,
            "per_class": distinct / num_classes if num_classes else None,
            "per_sample": distinct / samples if samples else None,
        }

    result = {
        name: describe(assignments[sample_group == g], len(groups.members[name]))
        for g, name in enumerate(GROUPS)
    }
    result["all"] = describe(assignments, groups.num_classes)
    return result


@torch.no_grad()
def _features_and_assignments(
    encoder: torch.nn.Module | None,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str,
    assign: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    features, labels = extract_features(encoder, batches, device)
    if assign is None:
        return features, labels, None
    chunks = [assign(chunk.to(device)).cpu() for chunk in features.split(1024)]
    return features, labels, torch.cat(chunks)


def evaluate_long_tail(
    groups: FrequencyGroups,
    train_batches: Iterable[tuple[Tensor, Tensor]],
    test_batches: Iterable[tuple[Tensor, Tensor]],
    encoder: torch.nn.Module | None,
    *,
    assign: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    linear_epochs: int = 100,
) -> dict[str, Any]:
    """Per-group k-NN and linear accuracy of a frozen encoder, and prototype diversity.

    k-NN with DINO's protocol (k = 20, T = 0.07), linear probe with the defaults of
    :func:`protogmm.evaluation.linear_probe`.

    Args:
        groups: frequency groups of the training classes.
        train_batches: labelled batches of the training split (the k-NN memory, the probe's
            training data, and the samples whose prototype assignments are counted).
        test_batches: labelled batches of the held-out split.
        encoder: images -> features; ``None`` for raw pixels (a baseline).
        assign: features ``[B, D]`` -> prototype index ``[B]`` (e.g. projection head,
            cosine scores, argmax); ``None`` skips the diversity.
        device: where the encoder and ``assign`` run.
        linear_epochs: linear-probe epochs; 0 skips the probe.

    Returns:
        ``{"knn": {group: acc}, "linear": {group: acc}, "prototypes": {group: {...}}}``
        (``linear`` / ``prototypes`` absent when skipped).
    """
    train_x, train_y, train_assignments = _features_and_assignments(
        encoder, train_batches, device, assign
    )
    test_x, test_y, _ = _features_and_assignments(encoder, test_batches, device, None)
    result: dict[str, Any] = {
        "knn": knn_group_accuracy(train_x, train_y, test_x, test_y, groups, k=20, temperature=0.07)
    }
    if linear_epochs:
        result["linear"] = linear_group_accuracy(
            train_x, train_y, test_x, test_y, groups, epochs=linear_epochs
        )
    if train_assignments is not None:
        result["prototypes"] = prototype_diversity(train_assignments, train_y, groups)
    return result


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def longtail_markdown(
    groups: FrequencyGroups,
    results: dict[str, dict[str, Any]],
    num_prototypes: int | None = None,
) -> str:
    """Markdown tables of a long-tail analysis: accuracy per group, then diversity.

    Args:
        groups: the frequency groups.
        results: label (e.g. ``"trained"``, ``"untrained encoder"``, ``"raw pixels"``) ->
            the output of :func:`evaluate_long_tail`; the first one with ``"prototypes"``
            gives the diversity table.
        num_prototypes: K, shown beside the distinct counts.
    """
    names = [*GROUPS, "all"]
    header = ["group", "classes", "train images"]
    for label, result in results.items():
        header.append(f"k-NN {label}")
        if "linear" in result:
            header.append(f"linear {label}")
    rows = []
    for name in names:
        if name == "all":
            classes, images = groups.num_classes, sum(groups.class_counts)
        else:
            classes = len(groups.members[name])
            images = sum(groups.class_counts[c] for c in groups.members[name])
        row = [name, str(classes), str(images)]
        for result in results.values():
            row.append(_pct(result["knn"].get(name)))
            if "linear" in result:
                row.append(_pct(result["linear"].get(name)))
        rows.append(row)
    lines = [
        f"Groups by training images per class: many > {groups.many_threshold:g}, "
        f"medium {groups.few_threshold:g}-{groups.many_threshold:g}, "
        f"few < {groups.few_threshold:g}. Accuracy (%) on held-out images of each group's "
        "classes (k-NN k=20, T=0.07; linear probe):",
        "",
        _table(header, rows),
        "",
    ]
    diversity = next((r["prototypes"] for r in results.values() if "prototypes" in r), None)
    if diversity is not None:
        k_text = f" of K = {num_prototypes}" if num_prototypes else ""
        lines += [
            f"Prototype diversity: distinct prototypes{k_text} that each group's training "
            "images are assigned to (argmax of the cosine scores):",
            "",
            _table(
                ["group", "classes", "train images", "distinct", "per class", "per 100 images"],
                [
                    [
                        name,
                        str(d["classes"]),
                        str(d["samples"]),
                        str(d["distinct"]),
                        "–" if d["per_class"] is None else f"{d['per_class']:.1f}",
                        "–" if d["per_sample"] is None else f"{100 * d['per_sample']:.1f}",
                    ]
                    for name, d in ((n, diversity[n]) for n in names)
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
