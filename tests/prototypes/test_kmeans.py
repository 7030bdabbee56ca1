"""Chunked k-means (the initialisation of OnlineGMM) against brute-force float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protogmm.prototypes.kmeans import (
    kmeans,
    kmeanspp_indices,
    lloyd_step,
    nearest_means,
    seed_means,
)


def clustered_rows(n: int, k: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """``n`` unit rows around ``k`` random unit centres (uniform labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.randint(0, k, (n,), generator=g)
    return F.normalize(centres[labels] + spread * torch.randn(n, dim, generator=g), dim=1)


def brute_force_nearest(x: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest mean of every row and its squared distance, float64, unchunked."""
    sq_dist = ((x.double()[:, None, :] - means.double()[None, :, :]) ** 2).sum(-1)
    value, index = sq_dist.min(dim=1)
    return index, value


def test_nearest_means_equals_brute_force_over_chunks_smaller_than_k() -> None:
    """Chunks of 3 of K = 10 means give the argmin and the squared distance of the whole."""
    x = clustered_rows(200, 10, 6, 0.3, seed=0)
    means = clustered_rows(10, 10, 6, 0.3, seed=1)
    index, sq_dist = nearest_means(x, means, chunk_size=3)
    expected_index, expected_sq = brute_force_nearest(x, means)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(sq_dist.double(), expected_sq, rtol=1e-4, atol=1e-6)
    whole_index, _ = nearest_means(x, means, chunk_size=10)
    assert torch.equal(index, whole_index)


def test_lloyd_step_equals_a_float64_reference_and_keeps_empty_means() -> None:
    """New mean = average of the rows assigned to it (float64 reference); a mean that gets
    no row (here one far outside the sphere) keeps its value."""
    x = clustered_rows(150, 5, 4, 0.2, seed=2)
    means = torch.cat([x[:5].clone(), torch.full((1, 4), 10.0)])
    labels, _ = brute_force_nearest(x, means)
    assert (labels == 5).sum() == 0  # the far mean is empty
    expected = means.double().clone()
    for k in range(5):
        members = x.double()[labels == k]
        assert members.shape[0] > 0
        expected[k] = members.mean(0)
    torch.testing.assert_close(lloyd_step(x, means, chunk_size=2).double(), expected)
    assert torch.equal(lloyd_step(x, means, chunk_size=2)[5], means[5])


def test_restarts_keep_the_lowest_inertia() -> None:
    """``restarts=4`` returns the run of lowest inertia among the four single runs that the
    same generator sequence gives, and its inertia is the sum of squared distances to the
    assigned means (the nearest ones)."""
    x = clustered_rows(300, 12, 5, 0.15, seed=3)
    best = kmeans(
        x, 12, generator=torch.Generator().manual_seed(0), iters=2, restarts=4, chunk_size=5
    )
    generator = torch.Generator().manual_seed(0)  # the same draws, one restart at a time
    singles = [
        kmeans(x, 12, generator=generator, iters=2, restarts=1, chunk_size=5) for _ in range(4)
    ]
    inertias = [run.inertia for run in singles]
    assert len(set(inertias)) > 1  # the restarts differ, so choosing matters
    winner = singles[inertias.index(min(inertias))]
    assert best.inertia == min(inertias)
    assert all(best.inertia <= inertia for inertia in inertias)
    assert torch.equal(best.means, winner.means) and torch.equal(best.labels, winner.labels)
    expected_labels, expected_sq = brute_force_nearest(x, best.means)
    assert torch.equal(best.labels, expected_labels)
    residual = ((x.double() - best.means.double()[best.labels]) ** 2).sum()
    assert best.inertia == pytest.approx(float(residual), rel=1e-5)
    assert float(expected_sq.sum()) == pytest.approx(float(residual), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_kmeanspp_indices_are_distinct_rows(seed: int) -> None:
    """On data with distinct rows the seeds are distinct, even when every row is a seed."""
    x = clustered_rows(40, 4, 3, 0.05, seed=seed)
    for n_seeds in (1, 7, 40):
        index = kmeanspp_indices(x, n_seeds, torch.Generator().manual_seed(seed))
        assert index.shape == (n_seeds,)
        assert index.unique().numel() == n_seeds, index.tolist()
        assert int(index.min()) >= 0 and int(index.max()) < 40


def test_seed_means_beyond_the_rows_are_unit_jittered_copies() -> None:
    """With K above the number of rows, every row is a seed and the rest are unit vectors
    near rows (jittered copies), all distinct."""
    x = clustered_rows(6, 2, 5, 0.1, seed=4)
    means = seed_means(x, 10, torch.Generator().manual_seed(0), kmeanspp_max_seeds=4096)
    assert means.shape == (10, 5)
    assert sorted(tuple(r) for r in means[:6].tolist()) == sorted(tuple(r) for r in x.tolist())
    torch.testing.assert_close(means[6:].norm(dim=1), torch.ones(4))
    assert float((means[6:] @ x.T).max(dim=1).values.min()) > 0.5
    gap = torch.cdist(means, means) + 10.0 * torch.eye(10)
    assert float(gap.min()) > 1e-4
