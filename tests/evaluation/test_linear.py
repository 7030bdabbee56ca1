"""Tests of the linear probe on frozen features."""

from __future__ import annotations

import time

import pytest
import torch

from protogmm.evaluation.linear import linear_probe


def gaussian_classes(
    num_classes: int, per_class: int, dim: int, seed: int, separation: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic unit-variance Gaussian classes around random centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = separation * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    centres = centres / centres.norm(dim=1, keepdim=True) * separation
    labels = torch.arange(num_classes).repeat(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=gen)
    return features, labels


def problem(seed_train: int = 1, seed_test: int = 2):
    train_x, train_y = gaussian_classes(5, 200, 32, seed_train)
    test_x, test_y = gaussian_classes(5, 100, 32, seed_test)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("normalize", [True, False])
def test_separable_classes_are_learned(normalize: bool) -> None:
    accuracy = linear_probe(*problem(), epochs=30, normalize=normalize)
    assert accuracy > 0.95  # chance is 0.2


def test_deterministic_given_the_seed() -> None:
    data = problem()
    # A harder problem, so that the batch order matters.
    hard_train = gaussian_classes(5, 100, 32, 3, separation=1.0)
    hard_test = gaussian_classes(5, 100, 32, 4, separation=1.0)
    kwargs = {"epochs": 5, "lr": 0.5, "batch_size": 16}
    a = linear_probe(*hard_train, *hard_test, seed=0, **kwargs)
    b = linear_probe(*hard_train, *hard_test, seed=0, **kwargs)
    assert a == b
    assert linear_probe(*data, epochs=5, seed=3) == linear_probe(*data, epochs=5, seed=3)


def test_runs_under_no_grad_and_inference_mode() -> None:
    data = problem()
    expected = linear_probe(*data, epochs=5)
    with torch.no_grad():
        assert linear_probe(*data, epochs=5) == expected
    with torch.inference_mode():
        inference_data = [t.clone() for t in data]
        assert linear_probe(*inference_data, epochs=5) == expected


def test_full_batch_and_float64_features() -> None:
    train_x, train_y, test_x, test_y = problem()
    accuracy = linear_probe(
        train_x.double(), train_y, test_x.double(), test_y, epochs=50, batch_size=10_000
    )
    assert accuracy > 0.95


def test_random_labels_give_chance_on_test() -> None:
    train_x, _, test_x, _ = problem()
    gen = torch.Generator().manual_seed(5)
    train_y = torch.randint(0, 5, (len(train_x),), generator=gen)
    test_y = torch.randint(0, 5, (len(test_x),), generator=gen)
    assert linear_probe(train_x, train_y, test_x, test_y, epochs=10) < 0.4


def test_constant_feature_dimensions_are_harmless() -> None:
    train_x, train_y, test_x, test_y = problem()
    train_x[:, 0] = 7.0
    test_x[:, 0] = 7.0
    assert linear_probe(train_x, train_y, test_x, test_y, epochs=20, normalize=False) > 0.95


def test_four_thousand_by_256_takes_seconds() -> None:
    gen = torch.Generator().manual_seed(6)
    train_x = torch.randn(4000, 256, generator=gen)
    train_y = torch.randint(0, 10, (4000,), generator=gen)
    start = time.perf_counter()
    linear_probe(train_x, train_y, train_x[:500], train_y[:500], epochs=100)
    assert time.perf_counter() - start < 20.0  # about 1-3 s on two shared cores


TRAIN_X, TRAIN_Y, TEST_X, TEST_Y = problem()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"train_features": TRAIN_X[:, :, None]}, r"train_features must have shape \[N, D\]"),
        ({"test_features": TEST_X[:, :5]}, r"test_features must have the same feature dimension"),
        ({"train_features": TRAIN_X.long()}, r"train_features must be a floating-point"),
        ({"test_features": TEST_X * float("nan")}, r"test_features has a non-finite value"),
        ({"train_labels": TRAIN_Y.float()}, r"train_labels must be an integer tensor"),
        ({"train_labels": TRAIN_Y[:-1]}, r"train_labels must have one label per row"),
        ({"test_labels": TEST_Y[:, None]}, r"test_labels must have shape \[N\]"),
        ({"test_labels": TEST_Y - 1}, r"test_labels must be >= 0"),
        ({"epochs": 0}, r"epochs must be an integer >= 1"),
        ({"lr": 0.0}, r"lr must be in \(0.0, inf\]"),
        ({"weight_decay": -1.0}, r"weight_decay must be in \[0.0, inf\]"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"num_classes": 3}, r"train_labels must be < num_classes=3, got a label 4"),
    ],
)
def test_bad_inputs_name_the_argument(override: dict, match: str) -> None:
    args = {
        "train_features": TRAIN_X,
        "train_labels": TRAIN_Y,
        "test_features": TEST_X,
        "test_labels": TEST_Y,
        "epochs": 1,
    } | override
    with pytest.raises(ValueError, match=match):
        linear_probe(**args)
