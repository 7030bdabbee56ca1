"""Truncated EM (``top_k``): exact at top_k = K, and what it approximates below (issue 20)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from protogmm.prototypes import MixtureOptions, OnlineGMM
from protogmm.prototypes.kinds import Decoupled
from protogmm.prototypes.sets import PrototypeSets

K, D = 12, 6

#: Every option the update branches on; the split-and-merge rows force merges and splits.
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "isotropic": {"covariance": "isotropic"},
    "joint annealing": {"anneal": "joint"},
    "no annealing": {"anneal_steps": 0},
    "time forgetting": {"forgetting": "time", "eta": 0.9},
    "no forgetting": {"forgetting": "none"},
    "uniform mixing": {"mixing": "uniform", "mixing_eta": 0.9},
    "merge and split": {"merge_overlap": 0.05, "reseed_min_share": 1.0},
    "isotropic merge and split": {
        "covariance": "isotropic",
        "merge_overlap": 0.05,
        "reseed_min_share": 1.0,
    },
    "no split and merge": {"merge_overlap": None, "reseed_min_share": None},
    "centred": {"center_momentum": 0.9},
}


def stream(kind: str, steps: int, rows: int = 40) -> list[torch.Tensor]:
    """Batches of float64 rows: isotropic noise, or four tight clusters on the sphere."""
    generator = torch.Generator().manual_seed(3)
    if kind == "random":
        return [
            torch.randn(rows, D, generator=generator, dtype=torch.float64) for _ in range(steps)
        ]
    centres = F.normalize(torch.randn(4, D, generator=generator, dtype=torch.float64), dim=1)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 4, (rows,), generator=generator)
        noise = torch.randn(rows, D, generator=generator, dtype=torch.float64)
        batches.append(centres[labels] + 0.05 * noise)
    return batches


def pair(options: dict[str, Any], top_k: int) -> tuple[OnlineGMM, OnlineGMM]:
    """A dense mixture and a truncated one, float64, same options and seed."""
    base = {"init_samples": 0, "anneal_steps": 4, "seed": 1} | options
    dense = OnlineGMM(K, D, **base, top_k=None).double()
    # Initialised on a batch of its own, then copied: a k-means cluster of two rows has its
    # mean half-way, so the initialising batch ties rows exactly (split targets by rounding).
    dense.update(torch.randn(40, D, generator=torch.Generator().manual_seed(9)).double())
    truncated = OnlineGMM(K, D, **base, top_k=top_k).double()
    truncated.load_state_dict(dense.state_dict())
    return dense, truncated


def scores_of(gmm: OnlineGMM, h: torch.Tensor) -> torch.Tensor:
    """``gmm.forward(h)`` in the mixture's dtype (forward itself computes in float32)."""
    z = F.normalize(h.to(gmm.mean.dtype), dim=1)
    if gmm.center_momentum is not None:
        z = F.normalize(z - gmm.embedding_center, dim=1)
    return z @ gmm.prototypes().T


def assert_same_state(a: OnlineGMM, b: OnlineGMM) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-11, msg=name)
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_top_k_equal_to_k_is_the_dense_update(name: str, data: str) -> None:
    dense, truncated = pair(OPTIONS[name], top_k=K)
    for h in stream(data, steps=7):
        expected = dense.update(h)
        step = truncated.update_and_score(h)
        torch.testing.assert_close(step.posterior(K), expected, rtol=1e-9, atol=1e-12)
        assert torch.equal(truncated.moved, dense.moved)
        assert_same_state(dense, truncated)
        # The scores the update returns are forward(h) against the updated prototypes.
        torch.testing.assert_close(step.scores, scores_of(dense, h), rtol=1e-9, atol=1e-12)
    if name.endswith("merge and split"):  # the moves were made, the same in both
        assert int(dense.num_reseeded) > 0 and int(dense.num_merged) > 0


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_truncated_posterior_is_the_dense_one_renormalised_over_the_candidates(
    covariance: str,
) -> None:
    """The approximation: a component outside a row's top-k by cosine gets nothing."""
    dense, truncated = pair({"covariance": covariance}, top_k=3)
    second = stream("random", steps=1)[0]
    posterior = dense.responsibilities(second)
    scores = scores_of(truncated, second)
    step = truncated.update_and_score(second)
    assert torch.equal(step.candidates, scores.topk(3, dim=1).indices)
    kept = posterior.gather(1, step.candidates)
    torch.testing.assert_close(step.responsibilities, kept / kept.sum(dim=1, keepdim=True))
    full = step.posterior(K)
    outside = torch.ones_like(full, dtype=torch.bool).scatter_(1, step.candidates, False)
    assert torch.all(full[outside] == 0) and torch.allclose(full.sum(dim=1), full.new_ones(40))
    # Only the candidates moved (responsibility forgetting keeps the others exactly).
    untouched = torch.ones(K, dtype=torch.bool)
    untouched[step.candidates.unique()] = False
    untouched &= ~truncated.moved
    before = dense.means  # the dense mixture has not seen ``second``
    assert torch.equal(truncated.means[untouched], before[untouched])


def test_scores_of_a_truncated_update_are_forward_after_it_in_float32() -> None:
    gmm = OnlineGMM(64, 16, init_samples=0, top_k=8, reseed_min_share=1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        h = torch.randn(50, 16, generator=generator)
        step = gmm.update_and_score(h)
        assert int(gmm.moved.sum()) > 0
        torch.testing.assert_close(step.scores, gmm(h), rtol=0, atol=1e-5)


def test_prototype_sets_share_the_scores_and_build_the_posterior_only_when_asked() -> None:
    owner = torch.nn.Module()
    owner.gmm = OnlineGMM(32, 8, init_samples=0, top_k=4)
    owner.patch = None
    sets = PrototypeSets.resolve(owner, torch.nn.ModuleDict(), torch.nn.ModuleDict(), Decoupled())
    h = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    sets.fit(h)
    posterior, scores = sets.fit(h, posterior=False)
    assert posterior is None
    torch.testing.assert_close(scores, owner.gmm(h), rtol=0, atol=1e-5)
    posterior, _ = sets.fit(h)
    assert posterior.shape == (20, 32) and int((posterior > 0).sum(dim=1).max()) <= 4
    owner.gmm = OnlineGMM(32, 8, init_samples=0, top_k=None)  # dense: the host scores it
    sets = PrototypeSets.resolve(owner, torch.nn.ModuleDict(), torch.nn.ModuleDict(), Decoupled())
    assert sets.fit(h, posterior=False) == (None, None)


def test_unit_means_follow_every_change_of_the_means_and_are_never_mutated() -> None:
    gmm = OnlineGMM(16, 4, init_samples=0, top_k=2)
    first = gmm.prototypes()
    kept = first.clone()
    assert gmm.prototypes() is first  # cached while the means are unchanged
    gmm.update(torch.randn(10, 4))
    assert torch.equal(first, kept)  # the update made a new tensor
    torch.testing.assert_close(gmm.prototypes(), F.normalize(gmm.means, dim=1))
    other = copy.deepcopy(gmm)
    other.update(torch.randn(10, 4))
    gmm.load_state_dict(other.state_dict())
    torch.testing.assert_close(gmm.prototypes(), F.normalize(other.means, dim=1))
    with torch.no_grad():
        gmm.mean[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(gmm.prototypes()[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(gmm.double().prototypes(), F.normalize(gmm.means, dim=1))


def test_top_k_is_an_option_and_at_least_two() -> None:
    assert OnlineGMM(8, 4, top_k=3).settings()["top_k"] == 3
    assert MixtureOptions().top_k == 8  # the default since issue 20 (None before: dense)
    assert OnlineGMM(8, 4, top_k=None).settings()["top_k"] is None
    with pytest.raises(ValueError, match="top_k"):
        OnlineGMM(8, 4, top_k=1)


def _two_rank_worker(rank: int, init_file: str, start: str, out: str) -> None:
    """Rank ``rank`` of 2 (gloo): fits its half of every batch with a truncated mixture."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        gmm = truncated_mixture(torch.load(start, weights_only=True))
        for h in stream("clustered", steps=5, rows=40):
            gmm.update(h[rank * 20 : (rank + 1) * 20])
        torch.save(gmm.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def truncated_mixture(state: dict[str, torch.Tensor]) -> OnlineGMM:
    """A truncated mixture (splits at every step) in the given state."""
    gmm = OnlineGMM(K, D, init_samples=0, top_k=4, reseed_min_share=1.0, seed=1).double()
    gmm.load_state_dict(state)
    return gmm


@pytest.mark.xdist_group("multiprocess")  # one launch at a time (tests/training/test_ddp.py)
def test_two_ranks_fit_the_truncated_mixture_one_process_fits(tmp_path) -> None:
    """Under DDP the candidates' statistics are all-reduced as dense statistics, and split
    and merge gathers every rank's candidates: the same mixture as one process."""
    start = pair({"reseed_min_share": 1.0}, top_k=4)[1].state_dict()
    torch.save(start, tmp_path / "start")
    arguments = (str(tmp_path / "pg"), str(tmp_path / "start"), str(tmp_path / "state"))
    torch.multiprocessing.spawn(_two_rank_worker, args=arguments, nprocs=2)
    alone = truncated_mixture(start)
    for h in stream("clustered", steps=5, rows=40):
        alone.update(h)
    assert int(alone.num_reseeded) > 0
    for rank in range(2):
        ranked = truncated_mixture(torch.load(tmp_path / f"state.{rank}", weights_only=True))
        assert_same_state(alone, ranked)


def test_the_init_buffer_is_released_once_initialised_and_checkpoints_still_load() -> None:
    """K x d no more after the k-means initialisation (issue 20, memory), same state keys."""
    g = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(8, 4)  # collects K = 8 rows
    keys = list(gmm.state_dict())
    gmm.update(torch.randn(5, 4, generator=g))
    collecting = copy.deepcopy(gmm.state_dict())
    gmm.update(torch.randn(5, 4, generator=g))
    assert bool(gmm.initialized) and tuple(gmm.init_buffer.shape) == (0, 4)
    assert list(gmm.state_dict()) == keys
    before = {name: value.clone() for name, value in gmm.state_dict().items()}
    before["init_buffer"] = torch.randn(8, 4)  # a checkpoint from before the release
    fresh = OnlineGMM(8, 4)
    fresh.load_state_dict(before)
    assert tuple(fresh.init_buffer.shape) == (0, 4)
    assert torch.equal(fresh.mean, gmm.mean)
    fresh.load_state_dict(gmm.state_dict())  # released into released
    fresh.load_state_dict(collecting)  # a mixture still collecting: the buffer is back
    assert tuple(fresh.init_buffer.shape) == (8, 4) and not bool(fresh.initialized)
    assert torch.equal(fresh.init_buffer, collecting["init_buffer"])
    h = torch.randn(5, 4, generator=g)
    fresh.update(h)
    assert bool(fresh.initialized)
