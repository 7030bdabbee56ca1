"""Tests of the weighted kNN classifier (DINO ``eval_knn.py`` protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protogmm.evaluation import knn_accuracy, knn_classify


def naive_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int | None = None,
) -> list[int]:
    """One test sample at a time, in float64 Python: the formula written out literally."""
    train = train_features.double().numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    labels = train_labels.tolist()
    num_classes = max(labels) + 1 if num_classes is None else num_classes
    predictions = []
    for x in test_features.double().numpy():
        x = x / np.linalg.norm(x)
        similarity = train @ x
        neighbours = np.argsort(-similarity, kind="stable")[:k]
        votes = [0.0] * num_classes
        for i in neighbours:
            votes[labels[i]] += math.exp(similarity[i] / temperature)
        best = max(votes)
        predictions.append(votes.index(best))  # lowest class index among ties
    return predictions


def random_problem(num_train: int, num_test: int, dim: int, num_classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(num_train, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (num_train,), generator=gen)
    test = torch.randn(num_test, dim, generator=gen, dtype=torch.float64)
    return train, labels, test


def separable_clusters(num_classes: int, per_class: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(num_classes, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=gen)
    return features, labels


# ----------------------------------------------------------------------- reference match


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.07), (200, 0.1)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_naive_reference(k, temperature, chunk_size):
    train, labels, test = random_problem(300, 41, 16, 7, seed=0)
    predictions = knn_classify(
        train, labels, test, k=k, temperature=temperature, chunk_size=chunk_size
    )
    assert predictions.dtype == torch.int64
    assert predictions.tolist() == naive_knn(train, labels, test, k, temperature)


def test_float32_features_match_reference():
    train, labels, test = random_problem(500, 100, 32, 10, seed=1)
    predictions = knn_classify(train.float(), labels, test.float(), k=20, temperature=0.07)
    assert predictions.tolist() == naive_knn(train.float(), labels, test.float(), 20, 0.07)


@settings(max_examples=30, deadline=None)
@given(
    num_train=st.integers(1, 60),
    num_test=st.integers(1, 20),
    dim=st.integers(2, 8),  # dim 1 gives exactly tied similarities (+-1)
    num_classes=st.integers(1, 6),
    k=st.integers(1, 80),
    temperature=st.sampled_from([0.02, 0.07, 0.1, 1.0, 10.0]),
    chunk_size=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_reference_property(
    num_train, num_test, dim, num_classes, k, temperature, chunk_size, seed
):
    train, labels, test = random_problem(num_train, num_test, dim, num_classes, seed)
    predictions = knn_classify(
        train,
        labels,
        test,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    expected = naive_knn(train, labels, test, k, temperature, num_classes)
    assert predictions.tolist() == expected


def test_vote_is_weighted_by_exp_similarity():
    """One very close neighbour of class 1 outvotes two farther ones of class 0 at small T."""
    train = torch.tensor([[1.0, 0.02], [0.5, 1.0], [0.5, -1.0]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    # exp(~1 / 0.07) > 2 exp(~0.45 / 0.07), but at T = 10 the weights are nearly equal.
    assert knn_classify(train, labels, test, k=3, temperature=0.07).tolist() == [1]
    assert knn_classify(train, labels, test, k=3, temperature=10.0).tolist() == [0]
    # k = 1 keeps only the nearest neighbour whatever T.
    assert knn_classify(train, labels, test, k=1, temperature=10.0).tolist() == [1]


# -------------------------------------------------------------------- accuracy and edges


def test_separable_clusters_are_classified_perfectly():
    train, train_labels = separable_clusters(5, 40, 16, seed=2)
    test, test_labels = separable_clusters(5, 20, 16, seed=3)
    assert knn_accuracy(train, train_labels, test, test_labels) == 1.0
    assert knn_accuracy(train, train_labels, test, test_labels, k=200, temperature=0.1) == 1.0


def test_accuracy_is_the_fraction_correct():
    train, train_labels = separable_clusters(4, 10, 8, seed=4)
    test, test_labels = separable_clusters(4, 5, 8, seed=5)
    wrong = test_labels.clone()
    wrong[:7] = (wrong[:7] + 1) % 4  # 7 of 20 labels made wrong
    assert knn_accuracy(train, train_labels, test, wrong) == pytest.approx(13 / 20)
    predictions = knn_classify(train, train_labels, test)
    expected = (predictions == wrong).double().mean().item()
    assert knn_accuracy(train, train_labels, test, wrong) == pytest.approx(expected)


def test_k_larger_than_train_set_uses_all_neighbours():
    train, labels, test = random_problem(15, 9, 4, 3, seed=6)
    all_neighbours = knn_classify(train, labels, test, k=15)
    assert knn_classify(train, labels, test, k=1000).tolist() == all_neighbours.tolist()
    assert all_neighbours.tolist() == naive_knn(train, labels, test, 15, 0.07)


def test_ties_pick_the_lowest_class_index():
    # Identical train features with labels 3 and 1: equal votes, so class 1 wins.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([3, 1, 2])
    test = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    for _ in range(3):
        assert knn_classify(train, labels, test, k=2).tolist() == [1, 1]
    # Symmetric neighbours of classes 2 and 0 around the test point: class 0 wins.
    train = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([2, 0])
    assert knn_classify(train, labels, torch.tensor([[1.0, 0.0]]), k=2).tolist() == [0]


def test_num_classes_larger_than_labels_and_zero_features():
    train, labels, test = random_problem(50, 10, 6, 3, seed=7)
    default = knn_classify(train, labels, test)
    assert knn_classify(train, labels, test, num_classes=10).tolist() == default.tolist()
    # An all-zero feature has similarity 0 to everything (F.normalize), like DINO.
    zero_test = torch.zeros(1, 6, dtype=torch.float64)
    assert knn_classify(train, labels, zero_test, k=5).shape == (1,)


def test_float16_inputs_and_integer_label_dtypes():
    train, labels, test = random_problem(80, 12, 8, 4, seed=8)
    expected = naive_knn(train.half(), labels, test.half(), 10, 0.1)
    for label_dtype in (torch.int32, torch.uint8, torch.int64):
        predictions = knn_classify(
            train.half(), labels.to(label_dtype), test.half(), k=10, temperature=0.1
        )
        assert predictions.dtype == torch.int64
        assert predictions.tolist() == expected


# ---------------------------------------------------------------------------- bad input


def test_bad_features_raise_naming_the_argument():
    train, labels, test = random_problem(10, 4, 3, 2, seed=9)
    with pytest.raises(ValueError, match=r"train_features must have shape \[N, D\]"):
        knn_classify(train[0], labels, test)
    with pytest.raises(ValueError, match=r"test_features must have shape \[N, D\]"):
        knn_classify(train, labels, test[0])
    with pytest.raises(
        ValueError, match=r"test_features must have the same feature dimension.*\(4, 2\).*\(10, 3\)"
    ):
        knn_classify(train, labels, test[:, :2])
    nan_test = test.clone()
    nan_test[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"test_features has a non-finite value .* row 2"):
        knn_classify(train, labels, nan_test)
    inf_train = train.clone()
    inf_train[7, 1] = float("inf")
    with pytest.raises(ValueError, match=r"train_features has a non-finite value .* row 7"):
        knn_classify(inf_train, labels, test)
    with pytest.raises(ValueError, match=r"train_features must be a floating-point"):
        knn_classify(train.long(), labels, test)
    with pytest.raises(ValueError, match=r"test_features must have at least 1 row"):
        knn_classify(train, labels, test[:0])


def test_bad_labels_raise_naming_the_argument():
    train, labels, test = random_problem(10, 4, 3, 2, seed=10)
    with pytest.raises(ValueError, match=r"train_labels must have one label per row.*\(9,\)"):
        knn_classify(train, labels[:9], test)
    with pytest.raises(ValueError, match=r"train_labels must have shape \[N\]"):
        knn_classify(train, labels[:, None], test)
    with pytest.raises(ValueError, match=r"train_labels must be an integer tensor"):
        knn_classify(train, labels.float(), test)
    with pytest.raises(ValueError, match=r"train_labels must be an integer tensor"):
        knn_classify(train, labels.bool(), test)
    with pytest.raises(ValueError, match=r"train_labels must be >= 0"):
        knn_classify(train, labels - 1, test)
    with pytest.raises(ValueError, match=r"train_labels must be < num_classes=2"):
        knn_classify(train, labels + 1, test, num_classes=2)
    with pytest.raises(ValueError, match=r"test_labels must have one label per row.*\(3,\)"):
        knn_accuracy(train, labels, test, labels[:3])
    with pytest.raises(ValueError, match=r"test_labels must be a torch.Tensor"):
        knn_accuracy(train, labels, test, [0, 1, 0, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k must be an integer >= 1"),
        ({"k": 2.5}, r"k must be an integer >= 1"),
        ({"temperature": 0.0}, r"temperature must be in \(0.0, inf\]"),
        ({"temperature": -0.1}, r"temperature must be in"),
        ({"temperature": float("nan")}, r"temperature must be in"),
        ({"chunk_size": 0}, r"chunk_size must be an integer >= 1"),
        ({"num_classes": 0}, r"num_classes must be an integer >= 1"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    train, labels, test = random_problem(10, 4, 3, 2, seed=11)
    with pytest.raises(ValueError, match=message):
        knn_classify(train, labels, test, **kwargs)
