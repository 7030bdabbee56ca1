"""OnlineGMM against reference formulas (design.md §3) and known mixtures."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protogmm.prototypes.gmm import OnlineGMM


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


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
@pytest.mark.parametrize("forgetting", ["responsibility", "time", "none"])
def test_update_follows_forgetting_and_m_step_formulas(covariance: str, forgetting: str) -> None:
    g = torch.Generator().manual_seed(1)
    _, sample = sphere_mixture([0.6, 0.4], dim=6, spread=0.4, generator=g)
    gmm = OnlineGMM(5, 6, covariance=covariance, forgetting=forgetting, eta=0.9, anneal_steps=5)
    gmm.update(sample(40)[0])  # initialises and takes one step
    before = {k: v.clone() for k, v in gmm.state_dict().items()}
    h = sample(30)[0]
    gamma_expected = gmm.responsibilities(h)
    gamma = gmm.update(h)
    torch.testing.assert_close(gamma, gamma_expected)

    n = gamma.sum(0).double()
    hd = h.double()
    s = gamma.double().T @ hd
    if covariance == "diagonal":
        q = gamma.double().T @ (hd * hd)
    else:
        q = gamma.double().T @ ((hd * hd).sum(1) / 6)
    lam = {"responsibility": 0.9**n, "time": torch.full_like(n, 0.9), "none": torch.ones_like(n)}[
        forgetting
    ]
    big_n = lam * before["stat_count"].double() + n
    big_s = lam[:, None] * before["stat_sum"].double() + s
    lam_q = lam[:, None] if covariance == "diagonal" else lam
    big_q = lam_q * before["stat_sq"].double() + q
    mu = big_s / big_n[:, None]
    if covariance == "diagonal":
        var = (big_q / big_n[:, None] - mu**2).clamp_min(gmm.var_floor)
    else:
        var = (big_q / big_n - (mu**2).sum(1) / 6).clamp_min(gmm.var_floor)
    mix_eta = 1.0 if forgetting == "none" else 0.9
    m = mix_eta * before["mix_count"].double() + n
    torch.testing.assert_close(gmm.stat_count.double(), big_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gmm.means.double(), mu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gmm.variances.double(), var, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gmm.mixing_weights.double(), m / m.sum(), rtol=1e-5, atol=1e-7)
    assert gmm.step == 2


def two_tight_components(forgetting: str) -> tuple[OnlineGMM, torch.Tensor, int, int]:
    """A 2-component mixture fitted to two far-apart tight clusters: (gmm, centres, idle, busy).

    Tight enough that a batch drawn at the busy centre gives the idle one exactly zero
    responsibility (the float32 softmax underflows).
    """
    gmm = OnlineGMM(2, 4, forgetting=forgetting, eta=0.5, anneal_steps=0, kmeans_iters=0)
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
    for name in ("stat_count", "stat_sum", "stat_sq", "mean", "var"):
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


def test_reseeding_moves_stranded_components_onto_data() -> None:
    g = torch.Generator().manual_seed(5)
    _, sample = sphere_mixture([1.0], dim=6, spread=0.05, generator=g)
    gmm = OnlineGMM(4, 6, anneal_steps=0, reseed_after=3, seed=0)
    # Initialise on far-away points so three components are stranded away from the data.
    gmm.update(torch.eye(6)[:4])
    for _ in range(6):
        gmm.update(sample(64)[0])
    assert int(gmm.num_reseeded) >= 3
    data_centre = F.normalize(sample(256)[0].mean(0), dim=0)
    assert float((gmm.prototypes() @ data_centre).min()) > 0.9


def test_reseeding_never_stacks_two_means_on_one_embedding() -> None:
    # 16 components, all stranded far from the data, and batches of 4 rows: at most 4 are
    # re-seeded per step, each onto its own embedding, so no two means ever coincide.
    g = torch.Generator().manual_seed(7)
    _, sample = sphere_mixture([1.0], dim=20, spread=0.3, generator=g)
    gmm = OnlineGMM(16, 20, anneal_steps=0, reseed_after=1, seed=0)
    gmm.update(-F.normalize(torch.eye(20)[:16] + 1.0, dim=1))  # stranded away from the data
    for step in range(1, 5):
        gmm.update(sample(4)[0])
        assert int(gmm.num_reseeded) <= 4 * step
        gap = torch.cdist(gmm.means, gmm.means) + torch.eye(16) * 10
        assert float(gap.min()) > 1e-4
    assert int(gmm.num_reseeded) >= 4


def test_reseeding_is_on_by_default_after_100_idle_steps_and_none_turns_it_off() -> None:
    # The default that the 16-epoch benchmark chose: a component stranded away from the data
    # moves at its 100th idle step, not before; reseed_after=None is plain online EM.
    g = torch.Generator().manual_seed(11)
    _, sample = sphere_mixture([1.0], dim=6, spread=0.05, generator=g)
    default, plain = (
        OnlineGMM(2, 6, anneal_steps=0),
        OnlineGMM(2, 6, anneal_steps=0, reseed_after=None),
    )
    assert default.reseed_after == 100 and plain.reseed_after is None
    stranded = -F.normalize(sample(1)[0], dim=1)  # the antipode of the data
    for gmm in (default, plain):
        gmm.update(torch.cat([sample(1)[0], stranded]))
    batches = [sample(32)[0] for _ in range(101)]
    for step, batch in enumerate(batches, start=1):
        for gmm in (default, plain):
            gmm.update(batch)
        assert int(default.num_reseeded) == (0 if step < 100 else 1), step
    assert int(plain.num_reseeded) == 0
    data_centre = F.normalize(torch.cat(batches).mean(0), dim=0)
    assert float((default.prototypes() @ data_centre).min()) > 0.9
    assert float((plain.prototypes() @ data_centre).min()) < 0.0  # still at the antipode


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
    a = OnlineGMM(5, 6, init_samples=50, reseed_after=2)
    for _ in range(4):
        a.update(x)
    b = OnlineGMM(5, 6, init_samples=50, reseed_after=2)
    b.load_state_dict(a.state_dict())
    assert b.step == a.step
    y = F.normalize(torch.randn(40, 6), dim=1)
    assert torch.equal(a.update(y), b.update(y))
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), name


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
    seed: int,
) -> None:
    gmm = OnlineGMM(
        k, d, covariance=covariance, forgetting=forgetting, anneal_steps=3, reseed_after=2
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
    gmm = OnlineGMM(65536, 256, kmeans_iters=1, chunk_size=8192)
    h = F.normalize(torch.randn(1024, 256), dim=1)
    gamma = gmm.update(h)
    gamma = gmm.update(h)
    assert gamma.shape == (1024, 65536) and torch.isfinite(gamma).all()


def test_chunked_e_step_equals_unchunked() -> None:
    h = F.normalize(torch.randn(64, 16), dim=1)
    for covariance in ("diagonal", "isotropic"):
        whole = OnlineGMM(300, 16, covariance=covariance, chunk_size=300)
        chunked = OnlineGMM(300, 16, covariance=covariance, chunk_size=7)
        torch.testing.assert_close(whole.update(h), chunked.update(h))
        torch.testing.assert_close(whole.log_joint(h), chunked.log_joint(h))


# --------------------------------------------------------------------------- centring
def cap_stream(generator: torch.Generator, n: int = 256) -> torch.Tensor:
    """8 clusters inside a small cap around e_0 (mean pairwise cosine ~0.98)."""
    directions = F.normalize(torch.randn(8, 32, generator=generator), dim=1)
    labels = torch.randint(0, 8, (n,), generator=generator)
    x = 0.15 * directions[labels] + 0.01 * torch.randn(n, 32, generator=generator)
    x[:, 0] += 1.0
    return F.normalize(x, dim=1)


def test_centred_mixture_spreads_prototypes_of_a_cap() -> None:
    from protogmm.diagnostics import unique_prototypes

    results = {}
    for center_momentum in (None, 0.9):
        g = torch.Generator().manual_seed(0)
        gmm = OnlineGMM(8, 32, center_momentum=center_momentum, anneal_steps=10, seed=0)
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
