"""Argument validation shared by every brick.

One place for the "bad input gets a clear one-line ValueError naming the culprit" rule,
so that each brick checks shapes the same way and nothing is silently broadcast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

Options = TypeVar("Options")


def options_from(
    cls: type[Options], value: Options | Mapping[str, Any] | None, key: str
) -> Options:
    """A dataclass of options from itself, a mapping of its options (those that differ from
    the defaults are enough: what checkpoints and Python callers pass) or None (defaults).

    Raises:
        ValueError: one line naming ``key`` and an unknown option (listing the known ones),
            or the dataclass's own first complaint about a value.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{key}: expected {cls.__name__} or a mapping of its options, got {value!r}"
        )
    known = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(
            f"{key}: unknown option(s) {', '.join(map(repr, unknown))}; it takes {', '.join(known)}"
        )
    return cls(**value)


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` if it is a finite number inside the given interval, else raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (
            value <= high if high_inclusive else value < high
        )
    if not ok:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_matrix(
    name: str,
    x: object,
    *,
    cols: int | None = None,
    min_rows: int = 1,
    finite: bool = True,
) -> Tensor:
    """Check that ``x`` is a floating-point ``[rows, cols]`` tensor and return it.

    Args:
        name: the argument's name, used in the error message.
        x: the value to check.
        cols: the required number of columns, or None for any.
        min_rows: the least number of rows accepted.
        finite: if True, NaN or Inf entries raise (naming the first bad row).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite:
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} has a non-finite value (NaN or Inf) in row {row}")
    return x


def check_labels(name: str, labels: object, num_rows: int, features_name: str) -> Tensor:
    """Check that ``labels`` is a 1-D integer tensor with one entry per row of the features."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape[0] != num_rows:
        raise ValueError(
            f"{name} must have one label per row of {features_name} ({num_rows}), got shape "
            f"{tuple(labels.shape)}"
        )
    return labels


def check_train_test_features(train_features: object, test_features: object) -> None:
    """Check two finite ``[N, D]`` feature matrices with the same ``D`` (k-NN, linear probe)."""
    check_matrix("train_features", train_features, min_rows=1, finite=True)
    check_matrix("test_features", test_features, min_rows=1, finite=True)
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features must have the same feature dimension as train_features, got "
            f"test_features shape {tuple(test_features.shape)} and train_features shape "
            f"{tuple(train_features.shape)}"
        )
