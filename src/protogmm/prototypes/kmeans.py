"""Chunked k-means on the sphere: the initialisation of :class:`~protogmm.prototypes.OnlineGMM`.

k-means++ seeding (Arthur & Vassilvitskii, 2007, in scikit-learn's greedy variant), Lloyd
iterations chunked over K so that no ``[N, K]`` matrix larger than one chunk is formed, and
several restarts kept by inertia (the likelihood of an equal-variance isotropic mixture with
hard assignments), as scikit-learn's ``KMeans(n_init=...)`` and ``GaussianMixture`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KMeansResult:
    """Means ``[K, d]``, the label of every row ``[N]``, the inertia (sum of squared distances)."""

    means: Tensor
    labels: Tensor
    inertia: float


def kmeanspp_indices(x: Tensor, n_seeds: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding: ``n_seeds`` row indices of ``x``.

    Each step draws ``2 + ln(K)`` candidates with probability proportional to the squared
    distance to the closest seed and keeps the one that lowers the total potential most
    (the variant scikit-learn uses): plain k-means++ often leaves a small cluster unseeded.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(max(n_seeds, 1)))
    first = int(torch.randint(0, n, (1,), generator=generator, device=x.device))
    chosen = [first]
    closest = ((x - x[first]) ** 2).sum(dim=1)
    closest[first] = 0.0
    x_sq = (x * x).sum(dim=1)
    for _ in range(1, n_seeds):
        if float(closest.sum()) <= 0.0:  # every row coincides with a seed: draw uniformly
            weights = torch.ones_like(closest)
            weights[chosen] = 0.0
            if float(weights.sum()) <= 0.0:
                weights = torch.ones_like(closest)
        else:
            weights = closest
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        # [trials, n] squared distances of every row to each candidate
        dist_sq = x_sq[None, :] - 2.0 * x[candidates] @ x.T + x_sq[candidates, None]
        potential = torch.minimum(closest[None, :], dist_sq.clamp_min(0.0))
        best = int(potential.sum(dim=1).argmin())
        chosen.append(int(candidates[best]))
        closest = potential[best]
        # A seed's distance to itself is 0 exactly; float32 rounding of the expanded square
        # can leave it positive for near-coincident rows, and the seed would be drawn again.
        closest[chosen[-1]] = 0.0
    return torch.tensor(chosen, device=x.device)


def nearest_means(x: Tensor, means: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Index of the nearest mean of every row and its squared distance, chunked over K."""
    best_score = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
    best_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for lo in range(0, means.shape[0], chunk_size):
        chunk = means[lo : lo + chunk_size]
        # argmin ||x - m||^2 = argmax (x.m - ||m||^2 / 2)
        score = x @ chunk.T - 0.5 * (chunk * chunk).sum(dim=1)
        value, index = score.max(dim=1)
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best_index = torch.where(better, index + lo, best_index)
    sq_dist = ((x * x).sum(dim=1) - 2.0 * best_score).clamp_min(0.0)
    return best_index, sq_dist


def lloyd_step(x: Tensor, means: Tensor, chunk_size: int) -> Tensor:
    """One k-means (Lloyd) step; empty clusters keep their mean."""
    labels, _ = nearest_means(x, means, chunk_size)
    sums = torch.zeros_like(means).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=means.shape[0]).to(x.dtype)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], means)


def seed_means(
    x: Tensor, k: int, generator: torch.Generator, kmeanspp_max_seeds: int, jitter: float = 0.5
) -> Tensor:
    """K initial means: k-means++ over the rows of ``x`` where possible.

    When K exceeds the number of rows (or ``kmeanspp_max_seeds``), the remaining means are
    rows of ``x`` drawn at random plus a jitter of ``jitter`` times the rows' spread,
    projected to the sphere, so every component starts inside the data's cap.
    """
    n = x.shape[0]
    n_seeds = min(k, n)
    if n_seeds <= kmeanspp_max_seeds:
        index = kmeanspp_indices(x, n_seeds, generator)
    else:
        index = torch.randperm(n, generator=generator, device=x.device)[:n_seeds]
    means = x[index]
    if k > n_seeds:
        extra = torch.randint(0, n, (k - n_seeds,), generator=generator, device=x.device)
        spread = x.std(dim=0, unbiased=False).mean().clamp_min(1e-3)
        noise = torch.randn(k - n_seeds, x.shape[1], generator=generator, device=x.device)
        jittered = x[extra] + jitter * spread * noise
        means = torch.cat([means, jittered / jittered.norm(dim=1, keepdim=True).clamp_min(1e-12)])
    return means


def kmeans(
    x: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    iters: int,
    restarts: int = 1,
    kmeanspp_max_seeds: int = 4096,
    chunk_size: int = 4096,
) -> KMeansResult:
    """k-means++ seeding and ``iters`` Lloyd steps, ``restarts`` times; the lowest inertia wins."""
    best: KMeansResult | None = None
    for _ in range(max(1, restarts)):
        means = seed_means(x, k, generator, kmeanspp_max_seeds)
        for _ in range(iters):
            means = lloyd_step(x, means, chunk_size)
        labels, sq_dist = nearest_means(x, means, chunk_size)
        inertia = float(sq_dist.sum())
        # A restart must win by more than float32 rounding (ties would otherwise depend on
        # the chunking of the nearest-mean search).
        if best is None or inertia < best.inertia * (1.0 - 1e-4):
            best = KMeansResult(means, labels, inertia)
    assert best is not None
    return best
