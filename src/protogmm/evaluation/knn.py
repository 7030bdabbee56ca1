"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of DINO's ``eval_knn.py`` (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, following Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018):

1. L2-normalise the train and test features.
2. For each test feature ``x``, take the ``k`` train features with the largest cosine
   similarity ``s_i = <x, x_i>``.
3. Each neighbour votes for its label with weight ``exp(s_i / T)``; the class with the
   largest total weight, ``argmax_c sum_{i in topk} exp(s_i / T) [y_i = c]``, is predicted.

Two hyper-parameter settings are common: DINO's (``k=20``, ``T=0.07``, the defaults here)
and lightly's ``KNNClassifier`` benchmark setting (``k=200``, ``T=0.1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import (
    check_in_range,
    check_labels,
    check_matrix,
    check_positive_int,
    check_train_test_features,
)

__all__ = ["knn_accuracy", "knn_classify"]


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict test labels by a similarity-weighted vote of the ``k`` nearest train features.

    Implements ``argmax_c sum_{i in topk(x)} exp(cos(x, x_i) / T) [y_i = c]`` (DINO
    ``eval_knn.py``; see the module docstring). Use ``k=20, temperature=0.07`` for DINO's
    protocol and ``k=200, temperature=0.1`` for lightly's.

    The computation runs on ``train_features``' device (test chunks are moved there) in
    float32, or float64 if either feature tensor is float64. Memory is
    ``O(chunk_size * N_train)``.

    Args:
        train_features: ``[N_train, d]`` finite floating-point features. All-zero rows are
            accepted and have similarity 0 to everything (as with ``F.normalize``).
        train_labels: ``[N_train]`` integer labels in ``[0, num_classes)``.
        test_features: ``[N_test, d]`` finite floating-point features, same ``d``.
        k: number of neighbours (>= 1). If ``k > N_train``, all ``N_train`` train features
            vote; this is not an error.
        temperature: ``T > 0`` in the vote weight ``exp(s / T)``.
        num_classes: number of classes; default ``max(train_labels) + 1``.
        chunk_size: test features processed at once (>= 1); never changes the result.

    Returns:
        ``[N_test]`` int64 predictions on ``train_features``' device.

    Ties: if several classes have the same total vote weight, the lowest class index is
    predicted (``torch.argmax`` returns the first maximum). Neighbours tied in similarity
    at the ``k``-th place are chosen by ``torch.topk``, which is deterministic for a given
    input and device.

    Raises:
        ValueError: naming the argument, on non-2-D or non-finite features, mismatched
            feature dimensions, labels that are not 1-D integers of length ``N_train`` or
            fall outside ``[0, num_classes)``, ``k < 1``, ``temperature <= 0`` or
            ``chunk_size < 1``.
    """
    check_train_test_features(train_features, test_features)
    check_labels("train_labels", train_labels, train_features.shape[0], "train_features")
    k = check_positive_int("k", k)
    temperature = check_in_range("temperature", temperature, 0.0, float("inf"), low_inclusive=False)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    lowest_label = int(train_labels.min())
    if lowest_label < 0:
        raise ValueError(f"train_labels must be >= 0, got a label {lowest_label}")
    highest_label = int(train_labels.max())
    if num_classes is None:
        num_classes = highest_label + 1
    num_classes = check_positive_int("num_classes", num_classes)
    if highest_label >= num_classes:
        raise ValueError(
            f"train_labels must be < num_classes={num_classes}, got a label {highest_label}"
        )

    device = train_features.device
    dtype = torch.promote_types(
        torch.promote_types(train_features.dtype, test_features.dtype), torch.float32
    )
    train_unit = F.normalize(train_features.detach().to(dtype), dim=1)
    labels = train_labels.detach().to(device=device, dtype=torch.long)
    num_neighbours = min(k, train_unit.shape[0])

    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = test_features[start : start + chunk_size].detach().to(device=device, dtype=dtype)
        similarity = F.normalize(chunk, dim=1) @ train_unit.T  # [chunk, N_train]
        top_similarity, top_index = similarity.topk(num_neighbours, dim=1)
        weights = (top_similarity / temperature).exp()
        # Scatter-add each neighbour's weight into its class: the one-hot vote of DINO.
        votes = torch.zeros(chunk.shape[0], num_classes, device=device, dtype=dtype)
        votes.scatter_add_(1, labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of :func:`knn_classify` on labelled test features.

    DINO's protocol is ``k=20, temperature=0.07`` (the defaults); lightly's is ``k=200,
    temperature=0.1``.

    Args:
        train_features: ``[N_train, d]`` features (see :func:`knn_classify`).
        train_labels: ``[N_train]`` integer labels.
        test_features: ``[N_test, d]`` features.
        test_labels: ``[N_test]`` integer labels; a label the train set lacks is simply
            never predicted.
        k: number of neighbours.
        temperature: vote temperature.
        num_classes: number of classes; default ``max(train_labels) + 1``.
        chunk_size: test features processed at once.

    Returns:
        The fraction of test features whose prediction equals their label, in ``[0, 1]``.

    Raises:
        ValueError: as :func:`knn_classify`, or if ``test_labels`` is not a 1-D integer
            tensor of length ``N_test``.
    """
    check_matrix("test_features", test_features, min_rows=1, finite=True)
    check_labels("test_labels", test_labels, test_features.shape[0], "test_features")
    predictions = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    correct = predictions == test_labels.detach().to(device=predictions.device, dtype=torch.long)
    return float(correct.double().mean())
