"""OnlineGMM against reference formulas (design.md §3) and known mixtures."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from protogmm.diagnostics import unique_prototypes
from protogmm.prototypes.gmm import (
    PLAIN_ANNEALED_EM,
    OnlineGMM,
    bhattacharyya_coefficient,
    project_to_sphere,
)
from protogmm.prototypes.kmeans import kmeans


def sphere_mixture(
    weights: list[float], dim: int, spread: float, generator: torch.Generator
) -> tuple[torch.Tensor, callable]:
    """Unit-norm cluster centres and a sampler of labelled unit vectors around them."""
    centres = F.normalize(torch.randn(len(weights), dim, generator=generator), dim=1)
    probs = torch.tensor(weights)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(probs, n, replacement=True, generator=generator)
        x = centres[labels] + spread * torch.randn(n, dim, generator=generator)
        return F.normalize(x, dim=1), labels

    return centres, sample


def best_matching(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """Permutation p maximising sum_k cos(a[k], b[p[k]]) (brute force, small K)."""
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    k = a.shape[0]
    return max(itertools.permutations(range(k)), key=lambda p: sum(sim[i, p[i]] for i in range(k)))


def reference_log_joint(gmm: OnlineGMM, h: torch.Tensor) -> torch.Tensor:
    """log pi_k - 1/2 sum_j [(h_j - mu_kj)^2 / var_kj + log var_kj], by broadcasting, float64."""
    h = F.normalize(h.double(), dim=1)
    mu = gmm.means.double()
    var = gmm.variances.double()
    if var.ndim == 1:
        var = var[:, None].expand_as(mu)
    diff = h[:, None, :] - mu[None, :, :]  # [N, K, d]: fine at test sizes
    quad = (diff**2 / var[None]).sum(-1) + torch.log(var).sum(-1)[None]
    return torch.log(gmm.mixing_weights.double())[None] - 0.5 * quad


# --------------------------------------------------------------------------- E and M steps
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_e_step_matches_reference_formula(covariance: str) -> None:
    g = torch.Generator().manual_seed(0)
    _, sample = sphere_mixture([0.5, 0.3, 0.2], dim=8, spread=0.3, generator=g)
    gmm = OnlineGMM(7, 8, covariance=covariance, chunk_size=3, anneal_steps=10, beta0=0.3)
    for _ in range(4):
        gmm.update(sample(64)[0])
    h = sample(32)[0]
    expected = reference_log_joint(gmm, h)
    torch.testing.assert_close(gmm.log_joint(h).double(), expected, rtol=1e-4, atol=1e-3)
    beta = gmm.beta
    assert 0.3 < beta < 1.0
    torch.testing.assert_close(
        gmm.responsibilities(h).double(),
        torch.softmax(beta * expected, dim=1),
        atol=1e-5,
        rtol=1e-4,
    )


def retention(forgetting: str, eta: float, count: torch.Tensor) -> torch.Tensor:
    """Reference ``lambda_k`` of step 3 for batch counts ``count`` (float64)."""
    if forgetting == "responsibility":
        return eta**count
    if forgetting == "time":
        return torch.full_like(count, eta)
    return torch.ones_like(count)


@pytest.mark.parametrize("anneal", ["means", "joint"])
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
@pytest.mark.parametrize("forgetting", ["responsibility", "time", "none"])
def test_update_follows_forgetting_and_m_step_formulas(
    covariance: str, forgetting: str, anneal: str
) -> None:
    """One step at beta < 1 against a float64 reference of steps 1-4.

    Means and weights come from the tempered posterior ``softmax(beta log rho)``; the variance
    statistics ``N', S', Q`` from the untempered ``softmax(log rho)`` with ``anneal="means"``,
    from the tempered one with ``"joint"``; mixing counts are discounted by
    ``exp(-(N / K) / mixing_memory)`` per step (1 without forgetting).
    """
    g = torch.Generator().manual_seed(1)
    _, sample = sphere_mixture([0.6, 0.4], dim=6, spread=0.4, generator=g)
    gmm = OnlineGMM(
        5,
        6,
        covariance=covariance,
        forgetting=forgetting,
        eta=0.9,
        anneal=anneal,
        anneal_steps=5,
        mixing_memory=7.0,
        merge_overlap=None,
        reseed_min_share=None,
    )
    gmm.update(sample(40)[0])  # initialises and takes one step
    before = {k: v.double().clone() for k, v in gmm.state_dict().items()}
    h = sample(30)[0]
    beta = gmm.beta
    assert 0.1 < beta < 0.5
    log_joint = reference_log_joint(gmm, h)
    gamma_expected = gmm.responsibilities(h)
    gamma = gmm.update(h)
    torch.testing.assert_close(gamma, gamma_expected)

    hd = h.double()
    tempered = torch.softmax(beta * log_joint, dim=1)
    torch.testing.assert_close(gamma.double(), tempered, rtol=1e-4, atol=1e-6)
    untempered = torch.softmax(log_joint, dim=1) if anneal == "means" else tempered
    n, s = tempered.sum(0), tempered.T @ hd
    n_var, s_var = untempered.sum(0), untempered.T @ hd
    if covariance == "diagonal":
        q = untempered.T @ (hd * hd)
    else:
        q = untempered.T @ ((hd * hd).sum(1) / 6)
    lam = retention(forgetting, 0.9, n)
    lam_var = retention(forgetting, 0.9, n_var)
    big_n = lam * before["stat_count"] + n
    big_s = lam[:, None] * before["stat_sum"] + s
    big_n_var = lam_var * before["var_count"] + n_var
    big_s_var = lam_var[:, None] * before["var_sum"] + s_var
    lam_q = lam_var[:, None] if covariance == "diagonal" else lam_var
    big_q = lam_q * before["stat_sq"] + q
    mu = big_s / big_n[:, None]
    mu_var = big_s_var / big_n_var[:, None]
    if covariance == "diagonal":
        var = (big_q / big_n_var[:, None] - mu_var**2).clamp_min(gmm.variance_floor)
    else:
        var = (big_q / big_n_var - (mu_var**2).sum(1) / 6).clamp_min(gmm.variance_floor)
    mix_retain = 1.0 if forgetting == "none" else math.exp(-(30 / 5) / 7.0)
    m = mix_retain * before["mix_count"] + n
    expected = {
        "stat_count": big_n,
        "stat_sum": big_s,
        "var_count": big_n_var,
        "var_sum": big_s_var,
        "stat_sq": big_q,
        "mix_count": m,
        "mean": mu,
        "var": var,
    }
    for name, value in expected.items():
        torch.testing.assert_close(
            getattr(gmm, name).double(), value, rtol=1e-4, atol=1e-6, msg=name
        )
    torch.testing.assert_close(gmm.mixing_weights.double(), m / m.sum(), rtol=1e-4, atol=1e-7)
    if anneal == "joint":
        assert torch.equal(gmm.var_count, gmm.stat_count)
        assert torch.equal(gmm.var_sum, gmm.stat_sum)
    else:  # the two posteriors differ, so the test tells the estimates apart
        assert float((big_n - big_n_var).abs().max()) > 0.1
    assert gmm.step == 2


@pytest.mark.parametrize("forgetting", ["responsibility", "none"])
def test_explicit_mixing_eta_is_a_fixed_per_step_retention(forgetting: str) -> None:
    """``mixing_eta`` overrides ``mixing_memory``: ``m <- mixing_eta m + n`` whatever N is."""
    g = torch.Generator().manual_seed(2)
    _, sample = sphere_mixture([0.5, 0.5], dim=4, spread=0.3, generator=g)
    gmm = OnlineGMM(
        3,
        4,
        forgetting=forgetting,
        mixing_eta=0.7,
        mixing_memory=1.0,
        anneal_steps=4,
        merge_overlap=None,
        reseed_min_share=None,
    )
    assert gmm.mixing_eta == 0.7
    gmm.update(sample(12)[0])
    for rows in (10, 50):
        before = gmm.mix_count.double().clone()
        gamma = gmm.update(sample(rows)[0])
        expected = 0.7 * before + gamma.double().sum(0)
        torch.testing.assert_close(gmm.mix_count.double(), expected, rtol=1e-6, atol=1e-6)


def test_defaults_resolve_floor_init_samples_and_mixing_eta() -> None:
    """``var_floor=None`` is ``1e-2 / d``, ``init_samples=None`` is K, ``mixing_eta`` is None
    (from ``mixing_memory``) except without forgetting (1); settings() reports the options as
    given (None), so one record of the defaults holds for every K and d."""
    gmm = OnlineGMM(12, 40)
    assert gmm.variance_floor == pytest.approx(1e-2 / 40)
    assert OnlineGMM(12, 40, var_floor=3e-3).variance_floor == 3e-3
    assert tuple(gmm.init_buffer.shape) == (12, 40)
    assert gmm.mixing_eta is None
    assert OnlineGMM(12, 40, forgetting="none").mixing_eta == 1.0
    settings_ = gmm.settings()
    assert settings_ == OnlineGMM(3, 5).settings()
    assert settings_["var_floor"] is None and settings_["init_samples"] is None
    assert settings_["init_variance"] == "pooled"
    assert settings_["anneal"] == "means" and settings_["merge_overlap"] == 0.5
    assert settings_["reseed_min_share"] == 0.05 and settings_["mixing_memory"] == 20.0
    assert settings_["init_restarts"] == 3 and settings_["kmeans_iters"] == 10


def two_tight_components(forgetting: str) -> tuple[OnlineGMM, torch.Tensor, int, int]:
    """A 2-component mixture fitted to two far-apart tight clusters: (gmm, centres, idle, busy).

    Tight enough that a batch drawn at the busy centre gives the idle one exactly zero
    responsibility (the float32 softmax underflows).
    """
    gmm = OnlineGMM(
        2,
        4,
        forgetting=forgetting,
        eta=0.5,
        anneal_steps=0,
        kmeans_iters=0,
        merge_overlap=None,
        reseed_min_share=None,
    )
    far_apart = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        gmm.update(F.normalize(far_apart.repeat(8, 1) + 0.01 * torch.randn(16, 4, generator=g)))
    idle = int(torch.argmax(gmm.prototypes() @ far_apart[1]))
    return gmm, far_apart, idle, 1 - idle


def test_idle_component_keeps_statistics_exactly_with_responsibility_forgetting() -> None:
    gmm, far_apart, idle, busy = two_tight_components("responsibility")
    before = {k: v.clone() for k, v in gmm.state_dict().items()}
    batch = F.normalize(far_apart[busy].repeat(8, 1) + 0.01 * torch.randn(8, 4), dim=1)
    gamma = gmm.update(batch)
    assert float(gamma[:, idle].sum()) == 0.0  # so n_idle = 0 and lambda_idle = eta^0 = 1
    for name in ("stat_count", "stat_sum", "var_count", "var_sum", "stat_sq", "mean", "var"):
        assert torch.equal(gmm.state_dict()[name][idle], before[name][idle]), name
    assert not torch.equal(gmm.mean[busy], before["mean"][busy])
    expected = 0.5 ** float(gamma[:, busy].sum()) * before["stat_count"][busy] + 8.0
    torch.testing.assert_close(gmm.stat_count[busy], expected)


def test_time_forgetting_decays_every_component() -> None:
    gmm, far_apart, idle, busy = two_tight_components("time")
    before = {k: v.clone() for k, v in gmm.state_dict().items()}
    gamma = gmm.update(far_apart[busy].repeat(8, 1))
    assert float(gamma[:, idle].sum()) == 0.0
    torch.testing.assert_close(gmm.stat_count[idle], 0.5 * before["stat_count"][idle])
    torch.testing.assert_close(gmm.stat_count[busy], 0.5 * before["stat_count"][busy] + 8.0)
    # the ratio S/N is unchanged, so the idle mean is kept while its weight decays
    torch.testing.assert_close(gmm.mean[idle], before["mean"][idle])


def test_beta_rises_from_beta0_to_one_on_a_cosine_schedule() -> None:
    gmm = OnlineGMM(3, 4, beta0=0.2, anneal_steps=10)
    x = F.normalize(torch.randn(16, 4), dim=1)
    seen = []
    for _ in range(12):
        seen.append(gmm.beta)
        gmm.update(x)
    assert seen[0] == pytest.approx(0.2)
    assert seen[5] == pytest.approx(0.2 + 0.8 * 0.5 * (1 - math.cos(math.pi * 5 / 10)))
    assert seen[10] == pytest.approx(1.0) and seen[11] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(seen[1:], seen[:-1], strict=True))
    assert OnlineGMM(3, 4, anneal_steps=0).beta == 1.0


# --------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_recovers_a_known_mixture_from_a_stream(covariance: str) -> None:
    weights = [0.35, 0.25, 0.2, 0.12, 0.08]
    g = torch.Generator().manual_seed(3)
    centres, sample = sphere_mixture(weights, dim=16, spread=0.08, generator=g)
    gmm = OnlineGMM(
        5, 16, covariance=covariance, eta=0.98, anneal_steps=50, init_samples=512, seed=0
    )
    for _ in range(250):
        gmm.update(sample(256)[0])
    perm = best_matching(centres, gmm.means)
    cos = (F.normalize(gmm.means[list(perm)], dim=1) * centres).sum(1)
    assert float(cos.min()) > 0.95
    recovered = gmm.mixing_weights[list(perm)]
    assert torch.allclose(recovered, torch.tensor(weights), atol=0.05), recovered
    # the variance of each coordinate around a centre is spread^2 before normalisation
    assert float(gmm.variances.mean()) == pytest.approx(0.08**2, rel=0.5)


def test_without_forgetting_a_fixed_dataset_reaches_the_batch_em_fixed_point() -> None:
    g = torch.Generator().manual_seed(4)
    _, sample = sphere_mixture([0.5, 0.3, 0.2], dim=8, spread=0.08, generator=g)
    data = sample(600)[0]
    gmm = OnlineGMM(3, 8, forgetting="none", anneal_steps=0, n_init=1e-3, kmeans_iters=10)
    # No forgetting = cumulative statistics (stochastic EM with step 1/t): O(1/t) residual.
    for _ in range(2000):
        gmm.update(data)
    # One batch-EM step (E-step, then M-step on the whole dataset) must leave it in place.
    gamma = gmm.responsibilities(data).double()
    n = gamma.sum(0)
    mu = gamma.T @ data.double() / n[:, None]
    var = gamma.T @ data.double() ** 2 / n[:, None] - mu**2
    torch.testing.assert_close(gmm.means.double(), mu, atol=1e-3, rtol=0)
    torch.testing.assert_close(gmm.variances.double(), var, atol=1e-3, rtol=0)
    torch.testing.assert_close(gmm.mixing_weights.double(), n / n.sum(), atol=1e-3, rtol=0)


def test_buffered_initialisation_returns_uniform_until_collected() -> None:
    gmm = OnlineGMM(4, 3, init_samples=20)
    x = F.normalize(torch.randn(8, 3), dim=1)
    for _ in range(2):
        torch.testing.assert_close(gmm.update(x), torch.full((8, 4), 0.25))
        assert not bool(gmm.initialized)
    gmm.update(x)
    assert bool(gmm.initialized) and gmm.step == 3


def test_kmeanspp_initialisation_separates_unequal_clusters() -> None:
    """Seeding from several batches puts one component on each of 8 unequal clusters."""
    weights = [0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03]
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        centres, sample = sphere_mixture(weights, dim=12, spread=0.05, generator=g)
        # anneal_steps=0: the first E-step at beta0 < 1 would blur the seeds toward the mean
        gmm = OnlineGMM(8, 12, init_samples=1024, seed=seed, anneal_steps=0)
        gmm.update(sample(1024)[0])
        nearest = (centres @ gmm.prototypes().T).argmax(dim=1)
        assert nearest.unique().numel() == 8


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_initialisation_is_best_kmeans_of_buffer_and_rest_with_pooled_variance(
    covariance: str,
) -> None:
    """The buffer plus the rest of the batch that completed it go to ``kmeans`` (best of
    ``init_restarts``, generator seeded with ``seed``); the variance is the pooled
    within-cluster variance of that assignment (per dimension, or its mean), floored."""
    g = torch.Generator().manual_seed(6)
    _, sample = sphere_mixture([0.4, 0.3, 0.2, 0.1], dim=5, spread=0.1, generator=g)
    batches = [project_to_sphere(sample(n)[0]) for n in (8, 8, 16)]
    gmm = OnlineGMM(4, 5, covariance=covariance, init_samples=20, init_restarts=4, seed=3)
    assert not gmm._collect_for_init(batches[0])
    assert not gmm._collect_for_init(batches[1])
    assert gmm._collect_for_init(batches[2]) and bool(gmm.initialized)
    rows = torch.cat(batches)  # 20 buffered + the 12 left over of the completing batch
    fit = kmeans(
        rows,
        4,
        generator=torch.Generator().manual_seed(3),
        iters=gmm.kmeans_iters,
        restarts=4,
        kmeanspp_max_seeds=gmm.kmeanspp_max_seeds,
        chunk_size=gmm.chunk_size,
    )
    torch.testing.assert_close(gmm.means, fit.means)
    residual = (rows.double() - fit.means.double()[fit.labels]) ** 2
    pooled = residual.mean(0) if covariance == "diagonal" else residual.mean()
    expected_var = pooled.clamp_min(gmm.variance_floor).expand_as(gmm.var)
    torch.testing.assert_close(gmm.variances.double(), expected_var, rtol=1e-5, atol=1e-8)
    assert float(pooled.min()) > gmm.variance_floor  # the floor did not decide it
    # the statistics reproduce the same means and variances
    torch.testing.assert_close(gmm.stat_count, torch.full((4,), gmm.n_init))
    rebuilt = copy.deepcopy(gmm)
    rebuilt._m_step()
    torch.testing.assert_close(rebuilt.mean, gmm.mean)
    torch.testing.assert_close(rebuilt.var, gmm.var, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- split and merge
def gaussian_density(x: torch.Tensor, mean: float, var: float) -> torch.Tensor:
    """The 1-D normal density ``N(x | mean, var)``."""
    return torch.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def numerical_bhattacharyya(mean_a: float, var_a: float, mean_b: float, var_b: float) -> float:
    """``int sqrt(p q) dx`` of two 1-D normals by the trapezoid rule on a fine float64 grid."""
    x = torch.linspace(-15.0, 15.0, 300_001, dtype=torch.float64)
    p, q = gaussian_density(x, mean_a, var_a), gaussian_density(x, mean_b, var_b)
    return float(torch.trapezoid(torch.sqrt(p * q), x))


def test_bhattacharyya_coefficient_matches_numerical_overlap() -> None:
    """1 for identical Gaussians; ``int sqrt(p q)`` in 1-D; a product over dimensions for
    diagonal Gaussians; isotropic (``[P]`` variances) equals diagonal with it repeated."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 3, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(5, 3, generator=g, dtype=torch.float64)
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(bhattacharyya_coefficient(mean, var, mean, var), ones)
    torch.testing.assert_close(bhattacharyya_coefficient(mean, var[:, 0], mean, var[:, 0]), ones)
    single = bhattacharyya_coefficient(mean.float(), var.float(), mean.float(), var.float())
    assert torch.equal(single, torch.ones(5))  # exactly 1 in float32 too
    # 1-D against the integral
    mean_b = mean + 0.7 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    var_b = 0.05 + 2.0 * torch.rand(5, 3, generator=g, dtype=torch.float64)
    per_dim = torch.tensor(
        [
            [
                numerical_bhattacharyya(*(float(t[i, j]) for t in (mean, var, mean_b, var_b)))
                for j in range(3)
            ]
            for i in range(5)
        ],
        dtype=torch.float64,
    )
    one_d = bhattacharyya_coefficient(mean[:, :1], var[:, :1], mean_b[:, :1], var_b[:, :1])
    torch.testing.assert_close(one_d, per_dim[:, 0], rtol=1e-9, atol=1e-12)
    # diagonal: the product of the per-dimension overlaps
    torch.testing.assert_close(
        bhattacharyya_coefficient(mean, var, mean_b, var_b), per_dim.prod(1), rtol=1e-9, atol=1e-12
    )
    assert 0.01 < float(per_dim.prod(1).min()) and float(per_dim.prod(1).max()) < 0.99
    # isotropic: the diagonal formula with the variance repeated over the dimensions
    iso_a, iso_b = var[:, 0], var_b[:, 0]
    torch.testing.assert_close(
        bhattacharyya_coefficient(mean, iso_a, mean_b, iso_b),
        bhattacharyya_coefficient(
            mean, iso_a[:, None].expand(5, 3), mean_b, iso_b[:, None].expand(5, 3)
        ),
    )


#: The per-component statistics that a merge adds up and a split halves.
MASS_STATISTICS = ("stat_count", "stat_sum", "var_count", "var_sum", "stat_sq", "mix_count")


def place_component(
    gmm: OnlineGMM, k: int, mean: torch.Tensor, var: torch.Tensor, count: float
) -> None:
    """Put component ``k`` at ``mean`` with variance ``var`` and statistics consistent with
    them (``count`` for every count, ``S = count mu``, ``Q = count (var + mu^2)``)."""
    gmm.mean[k] = mean
    gmm.var[k] = var
    for name in ("stat_count", "var_count", "mix_count"):
        getattr(gmm, name)[k] = count
    gmm.stat_sum[k] = count * mean
    gmm.var_sum[k] = count * mean
    gmm.stat_sq[k] = count * (var + gmm._mean_sq(mean[None])[0])


def around(centre: torch.Tensor, n: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` unit rows ``normalize(centre + spread * noise)``."""
    noise = torch.randn(n, centre.shape[0], generator=generator)
    return F.normalize(centre + spread * noise, dim=1)


def row_index(rows: torch.Tensor, vector: torch.Tensor) -> int:
    """Index of the row of ``rows`` exactly equal to ``vector`` (fails if there is none)."""
    hits = (rows == vector).all(dim=1).nonzero().flatten().tolist()
    assert hits, "not a row of the batch"
    return hits[0]


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_two_components_on_one_cluster_merge_and_the_freed_one_splits_a_third(
    covariance: str,
) -> None:
    """Two components on one cluster merge in one step: the heavier keeps the sums of all
    six statistics of both (post-M-step, from a copy updated with ``merge_overlap=None``) and
    is re-estimated from them; the freed one takes half the mass of the component that best
    explains the worst-explained row (the parent), with its mean on that row."""
    e = torch.eye(4)
    g = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(4, 4, covariance=covariance, anneal_steps=0, reseed_min_share=None)
    gmm.update(e)  # one component on each of e0, e1, e2, e3
    a, b = (int(gmm.prototypes()[:, i].argmax()) for i in (0, 1))
    moved, spare = (int(gmm.prototypes()[:, i].argmax()) for i in (2, 3))
    # the component of e2 now shares e0's cluster (heavier), the one of e3 is left alone
    place_component(gmm, moved, F.normalize(e[0] + 0.02 * e[3], dim=0), gmm.var[a].clone(), 5.0)
    batch = torch.cat([around(e[0], 24, 0.03, g), around(e[1], 24, 0.03, g)])
    h = project_to_sphere(batch)
    log_joint = gmm.log_joint(batch)
    reference = copy.deepcopy(gmm)
    reference.merge_overlap = None
    reference.update(batch)
    gmm.update(batch)

    overlap = bhattacharyya_coefficient(
        reference.mean[[a]], reference.var[[a]], reference.mean[[moved]], reference.var[[moved]]
    )
    assert float(overlap) > gmm.merge_overlap
    keep, drop = (
        (a, moved) if reference.stat_count[a] >= reference.stat_count[moved] else (moved, a)
    )
    assert float((reference.stat_count[a] - reference.stat_count[moved]).abs()) > 0.5
    # the parent: best explains the worst-explained row that a free component may split
    fit, best = log_joint.max(dim=1)
    candidates = [i for i in torch.argsort(fit).tolist() if int(best[i]) not in (keep, drop)]
    target = candidates[0]
    parent = int(best[target])
    assert parent == b  # e3's component explains no row
    assert int(gmm.num_merged) == 1 and int(gmm.num_reseeded) == 1
    assert sorted(gmm.moved.nonzero().flatten().tolist()) == sorted([keep, drop])

    stats = MASS_STATISTICS
    ref = {name: getattr(reference, name).double() for name in stats}
    for name in stats:
        got = getattr(gmm, name).double()
        torch.testing.assert_close(got[keep], ref[name][keep] + ref[name][drop], msg=name)
        torch.testing.assert_close(got[parent], 0.5 * ref[name][parent], msg=name)
    for name in ("stat_count", "mix_count"):  # a merge and a split conserve the mass
        torch.testing.assert_close(
            getattr(gmm, name).double().sum(), ref[name].sum(), rtol=1e-6, atol=0.0
        )
    merged_mean = (ref["stat_sum"][keep] + ref["stat_sum"][drop]) / (
        ref["stat_count"][keep] + ref["stat_count"][drop]
    )
    var_count = ref["var_count"][keep] + ref["var_count"][drop]
    var_mean = (ref["var_sum"][keep] + ref["var_sum"][drop]) / var_count
    sq = (ref["stat_sq"][keep] + ref["stat_sq"][drop]) / var_count
    if covariance == "diagonal":
        merged_var = (sq - var_mean**2).clamp_min(gmm.variance_floor)
    else:
        merged_var = (sq - (var_mean**2).sum() / 4).clamp_min(gmm.variance_floor)
    torch.testing.assert_close(gmm.mean[keep].double(), merged_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gmm.var[keep].double(), merged_var, rtol=1e-4, atol=1e-7)
    # the parent keeps its estimate; the freed component sits on the target row
    torch.testing.assert_close(gmm.mean[parent], reference.mean[parent])
    torch.testing.assert_close(gmm.var[parent], reference.var[parent])
    assert torch.equal(gmm.mean[drop], h[target])
    assert row_index(h, gmm.mean[drop]) == target
    torch.testing.assert_close(gmm.var[drop], reference.var[parent])
    torch.testing.assert_close(gmm.stat_count[drop], gmm.stat_count[parent])
    # everything else is untouched by the moves
    others = [k for k in range(4) if k not in (keep, drop, parent)]
    for name in (*stats, "mean", "var"):
        assert torch.equal(getattr(gmm, name)[others], getattr(reference, name)[others]), name


def test_merge_without_a_target_to_split_is_not_executed() -> None:
    """K = 2 on one cluster: the pair overlaps, but both are busy, no component is left to
    split, so the merge is dropped and the update equals one without merging."""
    g = torch.Generator().manual_seed(1)
    centre = F.normalize(torch.ones(5), dim=0)
    gmm = OnlineGMM(2, 5, anneal_steps=0, reseed_min_share=None)
    gmm.update(around(centre, 2, 0.02, g))
    batch = around(centre, 32, 0.03, g)
    reference = copy.deepcopy(gmm)
    reference.merge_overlap = None
    reference.update(batch)
    gmm.update(batch)
    overlap = bhattacharyya_coefficient(
        reference.mean[:1], reference.var[:1], reference.mean[1:], reference.var[1:]
    )
    assert float(overlap) > gmm.merge_overlap
    assert int(gmm.num_merged) == 0 and int(gmm.num_reseeded) == 0 and not gmm.moved.any()
    for name, value in reference.state_dict().items():
        assert torch.equal(gmm.state_dict()[name], value), name


def test_merges_beyond_the_available_targets_are_not_executed() -> None:
    """Two overlapping pairs but a single component left to split: only the more overlapping
    pair merges (and its freed component splits the fifth); the other pair is left as a
    step without merging would leave it."""
    e = torch.eye(6)
    g = torch.Generator().manual_seed(4)
    gmm = OnlineGMM(5, 6, anneal_steps=0, reseed_min_share=None)
    gmm.update(e[:5])
    owner = [int(gmm.prototypes()[:, i].argmax()) for i in range(5)]
    var = gmm.var[owner[0]].clone()
    # e2's component joins e0's cluster (close), e3's joins e1's (further off)
    place_component(gmm, owner[2], F.normalize(e[0] + 0.01 * e[5], dim=0), var, 3.0)
    place_component(gmm, owner[3], F.normalize(e[1] + 0.06 * e[5], dim=0), var, 3.0)
    batch = torch.cat([around(e[i], 16, 0.03, g) for i in (0, 1, 4)])
    reference = copy.deepcopy(gmm)
    reference.merge_overlap = None
    reference.update(batch)
    gmm.update(batch)

    def overlap(i: int, j: int) -> float:
        return float(
            bhattacharyya_coefficient(
                reference.mean[[i]], reference.var[[i]], reference.mean[[j]], reference.var[[j]]
            )
        )

    first, second = overlap(owner[0], owner[2]), overlap(owner[1], owner[3])
    assert first > second > gmm.merge_overlap  # both pairs qualify, the first ranks higher
    assert int(gmm.num_merged) == 1 and int(gmm.num_reseeded) == 1
    moved = set(gmm.moved.nonzero().flatten().tolist())
    assert moved == {owner[0], owner[2]}
    for k in (owner[1], owner[3]):  # the second pair: as after a step without merging
        for name in (*MASS_STATISTICS, "mean", "var"):
            assert torch.equal(getattr(gmm, name)[k], getattr(reference, name)[k]), name
    torch.testing.assert_close(gmm.stat_count[owner[4]], 0.5 * reference.stat_count[owner[4]])


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_split_halves_the_parent_and_puts_the_free_component_on_the_target(
    covariance: str,
) -> None:
    """``_split``: the parent's six statistics are halved (its mean and variance unchanged),
    the free component gets the same halves with mean = target and var = the parent's, so the
    total of ``stat_count`` and ``mix_count`` is kept (less the free one's discarded own)."""
    g = torch.Generator().manual_seed(2)
    _, sample = sphere_mixture([0.5, 0.3, 0.2], dim=6, spread=0.1, generator=g)
    gmm = OnlineGMM(
        4, 6, covariance=covariance, anneal_steps=3, merge_overlap=None, reseed_min_share=None
    )
    for _ in range(3):
        gmm.update(sample(48)[0])
    before = copy.deepcopy(gmm)
    parent, free = 1, 3
    target = project_to_sphere(sample(1)[0])[0]
    gmm._split(parent, free, target)

    stats = MASS_STATISTICS
    for name in stats:
        old, new = getattr(before, name), getattr(gmm, name)
        torch.testing.assert_close(new[parent], 0.5 * old[parent], msg=name)
        for k in (0, 2):
            assert torch.equal(new[k], old[k]), name
    for name in ("stat_count", "mix_count"):
        old, new = getattr(before, name).double(), getattr(gmm, name).double()
        torch.testing.assert_close(new[free], new[parent])
        torch.testing.assert_close(new.sum(), old.sum() - old[free], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(gmm.var_count[free], gmm.var_count[parent])
    assert torch.equal(gmm.mean[parent], before.mean[parent])
    assert torch.equal(gmm.var[parent], before.var[parent])
    assert torch.equal(gmm.mean[free], target)
    assert torch.equal(gmm.var[free], before.var[parent])
    assert gmm.moved.tolist() == [False, False, False, True]
    # the statistics agree with the new means and variances: an M-step changes nothing
    refit = copy.deepcopy(gmm)
    refit._m_step()
    torch.testing.assert_close(refit.mean, gmm.mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(refit.var, gmm.var, rtol=1e-4, atol=1e-7)


def stranded_mixture(
    reseed_min_share: float | None, data_centre: torch.Tensor, generator: torch.Generator
) -> OnlineGMM:
    """K = 2 in d = 6, initialised on one data row and on its antipode: the second component
    is stranded (the data never gives it any responsibility)."""
    gmm = OnlineGMM(2, 6, anneal_steps=0, merge_overlap=None, reseed_min_share=reseed_min_share)
    row = around(data_centre, 1, 0.05, generator)
    gmm.update(torch.cat([row, -row]))
    return gmm


def test_stranded_component_is_reseeded_at_the_predicted_step_and_not_before() -> None:
    """A component that gets nothing is re-seeded at the first step where its share times K
    falls below ``reseed_min_share`` (predicted by the recursion ``m <- r m + n``,
    ``r = exp(-(N / K) / mixing_memory)``, in float64); ``reseed_min_share=None`` never
    re-seeds it."""
    g = torch.Generator().manual_seed(11)
    centre = F.normalize(torch.randn(6, generator=g), dim=0)
    default = stranded_mixture(0.05, centre, g)
    plain = stranded_mixture(None, centre, torch.Generator().manual_seed(11))
    assert default.mixing_memory == 20.0 and default.reseed_min_share == 0.05  # defaults
    stranded = int((default.prototypes() @ centre).argmin())
    busy = 1 - stranded
    assert float(default.prototypes()[stranded] @ centre) < -0.9
    # reference: n_init = 1, then the initialising batch of 2 rows gives each one row
    mix = torch.tensor([1.0, 1.0], dtype=torch.float64) * math.exp(-(2 / 2) / 20.0) + 1.0
    torch.testing.assert_close(default.mix_count.double(), mix)
    retain = math.exp(-(4 / 2) / 20.0)  # batches of 4 rows, K = 2, mixing_memory = 20
    shares = []
    while not shares or shares[-1] >= 0.05:
        mix = mix * retain + torch.tensor([4.0 if k == busy else 0.0 for k in range(2)])
        shares.append(float(2 * mix[stranded] / mix.sum()))
    predicted = len(shares)  # the update after which the share is first below the bound
    assert 5 < predicted < 100
    assert shares[-1] < 0.05 * (1 - 1e-3) and (predicted == 1 or shares[-2] > 0.05 * (1 + 1e-3))
    batches = [around(centre, 4, 0.05, g) for _ in range(predicted + 5)]
    for step, batch in enumerate(batches, start=1):
        gamma = default.update(batch)
        plain.update(batch)
        if step <= predicted:  # it got nothing, and its share follows the recursion
            assert float(gamma[:, stranded].sum()) == 0.0
            share = float(plain.component_shares[stranded] * 2)
            assert share == pytest.approx(shares[step - 1], rel=1e-4)
        assert int(default.num_reseeded) == (0 if step < predicted else 1), step
        if step == predicted:
            assert bool(default.moved[stranded])
            row_index(project_to_sphere(batch), default.mean[stranded])  # on a batch row
    assert int(plain.num_reseeded) == 0
    assert float((default.prototypes() @ centre).min()) > 0.9
    assert float((plain.prototypes() @ centre).min()) < -0.9  # still at the antipode


def test_two_views_of_one_image_never_seed_two_means() -> None:
    """The two worst-explained rows of every batch are identical (two views of one image)
    and two components are freed at once: one split per parent, so the freed components go
    to distinct rows and no two means ever coincide."""
    e = torch.eye(8)
    g = torch.Generator().manual_seed(7)
    gmm = OnlineGMM(4, 8, anneal_steps=0, merge_overlap=None)
    gmm.update(torch.cat([e[:2], -e[:2]]))  # two components at the antipodes of the data
    antipodal = [int((gmm.prototypes() @ -e[i]).argmax()) for i in (0, 1)]
    outlier = F.normalize(e[0] + 0.6 * e[2], dim=0)  # far out in e0's cluster
    for _ in range(30):
        batch = torch.cat(
            [around(e[0], 16, 0.03, g), around(e[1], 16, 0.03, g), outlier.repeat(2, 1)]
        )
        h = project_to_sphere(batch)
        gmm.update(batch)
        gap = torch.cdist(gmm.means, gmm.means) + 10.0 * torch.eye(4)
        assert float(gap.min()) > 1e-3
        if int(gmm.num_reseeded) > 0:
            break
    assert int(gmm.num_reseeded) == 2
    assert sorted(gmm.moved.nonzero().flatten().tolist()) == sorted(antipodal)
    seeded = sorted(row_index(h, gmm.mean[k]) for k in antipodal)
    assert seeded[0] < 32 <= seeded[1]  # one on a row of e1's cluster, one on the outlier
    assert 16 <= seeded[0]


# --------------------------------------------------------------------------- known mixtures


def fit_known_mixture(
    k: int, covariance: str, seed: int, options: dict[str, Any] | None = None
) -> tuple[int, float]:
    """Stream 300 batches of 192 rows from K centres uniform on the sphere (d = 16, noise
    0.05 per dimension, uniform labels) into an exact-K mixture annealed over 250 steps.

    Returns:
        The smallest unique count at eps = 0.025 seen every 10th step (and at the end), and
        the smallest cosine of a centre to its Hungarian-matched prototype at the end.
    """
    steps = 300
    g = torch.Generator().manual_seed(10_000 + seed)
    centres, sample = sphere_mixture([1.0 / k] * k, dim=16, spread=0.05, generator=g)
    gmm = OnlineGMM(k, 16, covariance=covariance, anneal_steps=250, seed=seed, **(options or {}))
    min_unique = k
    for step in range(steps):
        gmm.update(sample(192)[0])
        if step % 10 == 0 or step == steps - 1:
            min_unique = min(min_unique, unique_prototypes(gmm.prototypes(), 0.025))
    similarity = (centres @ gmm.prototypes().T).numpy()
    rows, cols = linear_sum_assignment(-similarity)
    return min_unique, float(similarity[rows, cols].min())


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
@pytest.mark.parametrize("k", [8, 32])
def test_never_collapses_and_recovers_every_centre(k: int, covariance: str) -> None:
    """Issue 16's acceptance on 3 seeds: the unique count never falls below 90 % of K, and
    every centre is within cosine 0.95 of its own prototype at the end."""
    for seed in range(3):
        min_unique, min_cosine = fit_known_mixture(k, covariance, seed)
        assert min_unique >= 0.9 * k, (seed, min_unique)
        assert min_cosine > 0.95, (seed, min_cosine)


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_plain_annealed_online_em_fails_the_same_streams(covariance: str) -> None:
    """The mixture before split and merge fails the acceptance above on the same stream at
    K = 32 on some seed, so the acceptance test can tell the new rules from the old ones.

    Measured: seed 0 keeps two means on one centre and leaves another centre without a
    prototype (matched cosine 0.42); its unique count stays at 31 of 32, above 90 %, so at
    d = 16 the old failure is a lost centre, not a drop of the count.
    """
    results = [fit_known_mixture(32, covariance, seed, PLAIN_ANNEALED_EM) for seed in range(3)]
    assert any(u < 0.9 * 32 or cosine <= 0.95 for u, cosine in results), results


# --------------------------------------------------------------------------- interface
def test_forward_is_cosine_and_no_gradient_reaches_the_mixture() -> None:
    gmm = OnlineGMM(6, 5)
    gmm.update(F.normalize(torch.randn(32, 5), dim=1))
    assert list(gmm.parameters()) == []
    z = torch.randn(4, 5, requires_grad=True)
    scores = gmm(z)
    expected = F.normalize(z, dim=1) @ F.normalize(gmm.means, dim=1).T
    torch.testing.assert_close(scores, expected)
    scores.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(not b.requires_grad for b in gmm.buffers())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gmm(z).dtype == torch.float32


def test_prototypes_are_unit_norm_and_responsibilities_sum_to_one() -> None:
    gmm = OnlineGMM(10, 7, covariance="isotropic")
    x = F.normalize(torch.randn(50, 7), dim=1)
    gmm.update(x)
    torch.testing.assert_close(gmm.prototypes().norm(dim=1), torch.ones(10))
    torch.testing.assert_close(gmm.responsibilities(x).sum(1), torch.ones(50))


def test_state_dict_round_trips_every_state_exactly() -> None:
    x = F.normalize(torch.randn(40, 6), dim=1)
    a = OnlineGMM(5, 6, init_samples=50, reseed_min_share=0.9)
    for _ in range(4):
        a.update(x)
    b = OnlineGMM(5, 6, init_samples=50, reseed_min_share=0.9)
    b.load_state_dict(a.state_dict())
    assert b.step == a.step
    assert {"var_count", "var_sum", "num_merged"} <= set(a.state_dict())
    assert "moved" not in a.state_dict()  # per step, not saved
    y = F.normalize(torch.randn(40, 6), dim=1)
    assert torch.equal(a.update(y), b.update(y))
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), name
    assert torch.equal(a.moved, b.moved)


def test_state_dict_from_before_split_and_merge_loads() -> None:
    """A mixture saved before the variance statistics were kept apart (``idle_steps``, no
    ``var_count``, ``var_sum``, ``num_merged``; empty init buffer: ``init_samples=0``) loads
    strictly, also under a prefix, with ``N' = N``, ``S' = S`` and no merges, and updates."""
    g = torch.Generator().manual_seed(8)
    _, sample = sphere_mixture([0.5, 0.5], dim=6, spread=0.1, generator=g)
    saved = OnlineGMM(5, 6, init_samples=0, anneal_steps=2)
    for _ in range(3):
        saved.update(sample(32)[0])
    old = {
        name: value.clone()
        for name, value in saved.state_dict().items()
        if name not in ("var_count", "var_sum", "num_merged")
    }
    old["idle_steps"] = torch.tensor([0, 3, 0, 1, 0])
    for prefix in ("", "prototypes."):
        fresh = OnlineGMM(5, 6, init_samples=old["init_buffer"].shape[0], anneal_steps=2)
        host = fresh if not prefix else torch.nn.ModuleDict({"prototypes": fresh})
        checkpoint = {prefix + name: value for name, value in old.items()}
        host.load_state_dict(checkpoint)  # strict
        assert prefix + "idle_steps" in checkpoint  # the caller's dict is left alone
        for name, value in old.items():
            if name != "idle_steps":
                assert torch.equal(fresh.state_dict()[name], value), name
        assert torch.equal(fresh.var_count, old["stat_count"])
        assert torch.equal(fresh.var_sum, old["stat_sum"])
        assert int(fresh.num_merged) == 0 and fresh.step == 3
        gamma = fresh.update(sample(32)[0])
        assert torch.isfinite(gamma).all() and torch.isfinite(fresh.var).all()


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"dim": -1}, "dim"),
        ({"covariance": "full"}, "covariance"),
        ({"forgetting": "sometimes"}, "forgetting"),
        ({"eta": 0.0}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"beta0": 0.0}, "beta0"),
        ({"var_floor": 0.0}, "var_floor"),
        ({"mixing": "equal"}, "mixing"),
        ({"anneal": "all"}, "anneal"),
        ({"mixing_memory": 0.0}, "mixing_memory"),
        ({"mixing_eta": 0.0}, "mixing_eta"),
        ({"merge_overlap": 0.0}, "merge_overlap"),
        ({"merge_overlap": 1.5}, "merge_overlap"),
        ({"reseed_min_share": 0.0}, "reseed_min_share"),
        ({"init_restarts": 0}, "init_restarts"),
    ],
)
def test_bad_constructor_arguments_name_the_culprit(kwargs: dict, culprit: str) -> None:
    args = {"num_prototypes": 4, "dim": 3} | kwargs
    with pytest.raises(ValueError, match=culprit):
        OnlineGMM(**args)


@pytest.mark.parametrize(
    "h",
    [torch.randn(5), torch.randn(5, 4), torch.randn(0, 3), torch.randn(2, 3, 3)],
)
def test_bad_shapes_are_rejected_naming_h(h: torch.Tensor) -> None:
    gmm = OnlineGMM(4, 3)
    with pytest.raises(ValueError, match=r"^h "):
        gmm.update(h)


def test_nan_in_h_is_rejected_naming_the_row() -> None:
    x = torch.randn(6, 3)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="h has a non-finite value.*row 4"):
        OnlineGMM(4, 3).update(x)
    with pytest.raises(ValueError, match="z must have 3 columns"):
        OnlineGMM(4, 3)(torch.randn(2, 5))


# --------------------------------------------------------------------------- properties
def _pathological_batch(mode: str, n: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if mode == "duplicates":
        x = x[:1].repeat(n, 1)
    elif mode == "zeros":
        x[: max(1, n // 2)] = 0.0
    elif mode == "huge":
        x = x * 1e30
    elif mode == "tiny":
        x = x * 1e-30
    elif mode == "all_zero":
        x = torch.zeros(n, d)
    if dtype != torch.float32:
        x = x.clamp(-6e4, 6e4).to(dtype)
    return x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["random", "duplicates", "zeros", "huge", "tiny", "all_zero"]),
    n=st.integers(1, 12),
    k=st.integers(1, 20),
    d=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    covariance=st.sampled_from(["diagonal", "isotropic"]),
    forgetting=st.sampled_from(["responsibility", "time", "none"]),
    anneal=st.sampled_from(["means", "joint"]),
    seed=st.integers(0, 2**16),
)
def test_no_nan_or_inf_for_any_finite_input(
    mode: str,
    n: int,
    k: int,
    d: int,
    dtype: torch.dtype,
    covariance: str,
    forgetting: str,
    anneal: str,
    seed: int,
) -> None:
    """Every buffer, score and responsibility stays finite for any finite input, with split
    and merge active (a high ``reseed_min_share`` so that moves happen)."""
    gmm = OnlineGMM(
        k,
        d,
        covariance=covariance,
        forgetting=forgetting,
        anneal=anneal,
        anneal_steps=3,
        reseed_min_share=0.9,
        init_samples=0,
    )
    for step in range(4):
        x = _pathological_batch(mode, n, d, seed + step, dtype)
        gamma = gmm.update(x)
        assert gamma.shape == (n, k) and torch.isfinite(gamma).all()
        torch.testing.assert_close(gamma.sum(1), torch.ones(n), atol=1e-5, rtol=0)
        for name, buffer in gmm.state_dict().items():
            if buffer.is_floating_point():
                assert torch.isfinite(buffer).all(), name
        assert torch.isfinite(gmm(x.float())).all()
        assert torch.isfinite(gmm.responsibilities(x)).all()


@pytest.mark.slow
def test_large_k_runs_chunked() -> None:
    """K = 65536, N = 1024, d = 256: the E-step and statistics never build N x K x d."""
    gmm = OnlineGMM(65536, 256, kmeans_iters=1, init_restarts=1, init_samples=0, chunk_size=8192)
    h = F.normalize(torch.randn(1024, 256), dim=1)
    gamma = gmm.update(h)
    gamma = gmm.update(h)
    assert gamma.shape == (1024, 65536) and torch.isfinite(gamma).all()


def test_chunked_e_step_equals_unchunked() -> None:
    h = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    for covariance in ("diagonal", "isotropic"):
        # init_samples=0: initialise on this batch of 64 rows (the default waits for K = 300);
        # one k-means run: with K > N every restart has inertia 0 up to rounding, and the
        # rounding (which depends on the chunk size) would pick the restart
        options = {"covariance": covariance, "init_samples": 0, "init_restarts": 1}
        whole = OnlineGMM(300, 16, chunk_size=300, **options)
        chunked = OnlineGMM(300, 16, chunk_size=7, **options)
        torch.testing.assert_close(whole.update(h), chunked.update(h))
        # float32 products of other shapes: equal to rounding (log joints reach ~3e3 here)
        torch.testing.assert_close(whole.log_joint(h), chunked.log_joint(h), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- centring
def cap_stream(generator: torch.Generator, n: int = 256) -> torch.Tensor:
    """8 clusters inside a small cap around e_0 (mean pairwise cosine ~0.98)."""
    directions = F.normalize(torch.randn(8, 32, generator=generator), dim=1)
    labels = torch.randint(0, 8, (n,), generator=generator)
    x = 0.15 * directions[labels] + 0.01 * torch.randn(n, 32, generator=generator)
    x[:, 0] += 1.0
    return F.normalize(x, dim=1)


def test_centred_mixture_spreads_prototypes_of_a_cap() -> None:
    # Moves off: every cap_stream batch has 8 new cluster directions, so the mixture always
    # lags and split and merge would move components each step (not what is tested here).
    results = {}
    for center_momentum in (None, 0.9):
        g = torch.Generator().manual_seed(0)
        gmm = OnlineGMM(
            8,
            32,
            center_momentum=center_momentum,
            anneal_steps=10,
            seed=0,
            merge_overlap=None,
            reseed_min_share=None,
        )
        for _ in range(30):
            gmm.update(cap_stream(g))
        results[center_momentum] = unique_prototypes(gmm.prototypes(), eps=0.1)
        if center_momentum is not None:
            # the running centre is the stream's mean direction
            assert float(F.cosine_similarity(gmm.embedding_center, torch.eye(32)[0], dim=0)) > 0.9
    assert results[None] == 1  # all 8 prototypes within cosine 0.9 of each other
    assert results[0.9] == 8


def test_centred_forward_scores_centred_embeddings() -> None:
    gmm = OnlineGMM(4, 6, center_momentum=0.5)
    h = F.normalize(torch.randn(20, 6) + torch.tensor([3.0, 0, 0, 0, 0, 0]), dim=1)
    gmm.update(h)
    z = torch.randn(3, 6)
    centred = F.normalize(F.normalize(z, dim=1) - gmm.embedding_center, dim=1)
    torch.testing.assert_close(gmm(z), centred @ gmm.prototypes().T)
    with pytest.raises(ValueError, match="center_momentum"):
        OnlineGMM(4, 6, center_momentum=1.0)


def test_an_initialised_mixture_loads_under_another_init_samples() -> None:
    """The init buffer is spent once initialised: a checkpoint of the former default
    (``init_samples=0``, an empty buffer) loads into today's mixture, with the same state;
    one still collecting does not (its buffer is state)."""
    g = torch.Generator().manual_seed(5)
    old = OnlineGMM(8, 4, init_samples=0)
    old.update(torch.randn(16, 4, generator=g))
    new = OnlineGMM(8, 4)  # init_samples=None: a [8, 4] buffer
    new.load_state_dict(old.state_dict())
    for name in ("mean", "var", "stat_count", "mix_count", "initialized", "num_steps"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
    h = torch.randn(6, 4, generator=g)
    torch.testing.assert_close(new.update(h), old.update(h))
    collecting = OnlineGMM(8, 4, init_samples=20)
    collecting.update(torch.randn(5, 4, generator=g))
    with pytest.raises(RuntimeError, match="init_buffer"):
        OnlineGMM(8, 4).load_state_dict(collecting.state_dict())
