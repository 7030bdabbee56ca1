"""Sinkhorn-Knopp balancing against SwAV's algorithm, written out independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protogmm.objectives.balancing import sinkhorn_knopp


def reference_sinkhorn(logits: np.ndarray, num_iters: int) -> np.ndarray:
    """SwAV Algorithm 1 in float64 numpy: Q = exp(logits)^T, alternate K- and N-normalisation."""
    q = np.exp(logits - logits.max()).T
    q /= q.sum()
    k, n = q.shape
    for _ in range(num_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


@pytest.mark.parametrize(("n", "k", "iters"), [(16, 8, 3), (5, 40, 3), (64, 10, 7)])
def test_matches_the_reference_algorithm(n: int, k: int, iters: int) -> None:
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 3
    expected = reference_sinkhorn(logits.double().numpy(), iters)
    np.testing.assert_allclose(
        sinkhorn_knopp(logits, iters).numpy(), expected, rtol=1e-4, atol=1e-6
    )


def test_targets_are_distributions_with_uniform_prototype_mass() -> None:
    # Heavily unbalanced logits: every sample prefers prototype 0.
    logits = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    logits[:, 0] += 8.0
    targets = sinkhorn_knopp(logits, num_iters=50)
    torch.testing.assert_close(targets.sum(1), torch.ones(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.sum(0), torch.full((16,), 128 / 16), atol=1e-3, rtol=0)
    assert torch.softmax(logits, 1).sum(0)[0] > 100  # without balancing, one prototype wins


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp(torch.randn(4))
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_knopp(torch.randn(4, 3), num_iters=0)
