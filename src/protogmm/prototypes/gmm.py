"""Decoupled prototypes: an online Gaussian mixture fitted by EM to teacher embeddings.

This is the fix of "Why Prototypes Collapse" (Arteaga et al., ICLR 2026): the prototypes are
no longer learned by gradient with the encoder (paper eq. 1) but estimated in an alternating
step from the EMA teacher's embeddings (eq. 2), and the encoder is then trained against the
fixed prototypes (eq. 3). The exact update equations of the paper are not public; this is the
reconstruction of ``design.md`` §3, and each choice is a constructor option so that ablations
can test it.

Per step ``t``, with ``h`` the ``[N, d]`` teacher embeddings projected onto the unit sphere:

1. E-step with deterministic annealing (Ueda & Nakano, 1998)::

       log rho_ik = log pi_k - 1/2 sum_j [(h_ij - mu_kj)^2 / var_kj + log var_kj]
       gamma_ik   = softmax_k(beta_t * log rho_ik),   beta_t: beta0 -> 1 (cosine)

   With ``anneal="means"`` (default) the tempered ``gamma`` estimates the means and weights
   only; the variances come from the untempered posterior ``softmax_k(log rho_ik)``. Under
   plain annealing (``anneal="joint"``) soft responsibilities inflate the variances, which
   soften the next E-step further, until every mean sits at the data mean (measured: 1
   unique prototype of 32 at step 100 at d = 16, with the former initial variance, that of
   all embeddings); with the variances kept at the components' own
   spread, ``beta`` softens the assignments between neighbours without merging them.
2. batch statistics ``n_k = sum_i gamma_ik``, ``s_k = sum_i gamma_ik h_i``; for the
   variances ``n'_k, s'_k, q_k = sum_i gamma'_ik (1, h_i, h_i^2)`` (all-reduced over ranks);
3. forgetting (Celaya & Agostini, 2015, responsibility-based) ``lambda_k = eta ** n_k``,
   ``N_k <- lambda_k N_k + n_k`` and likewise for ``S_k`` (and ``N'_k, S'_k, Q_k`` with
   ``lambda'_k = eta ** n'_k``); mixing counts ``m_k <- r m_k + n_k`` with one discount ``r``
   per step, set so that they remember ``mixing_memory`` expected hits of a component;
4. M-step ``pi = m / sum(m)``, ``mu_k = S_k / N_k``,
   ``var_k = max(Q_k / N'_k - (S'_k / N'_k)^2, var_floor)``, prototypes ``c_k = mu_k / ||mu_k||``;
5. split and merge (Ueda et al., 2000, online): two components whose densities overlap
   (Bhattacharyya coefficient above ``merge_overlap``) are merged into one, and a component
   whose mixing weight fell below ``reseed_min_share / K`` is stranded; each component so
   freed takes half of the mass of the component that best explains one of the batch's
   worst-explained embeddings, with its mean on that embedding (one split per component
   and step, so two views of one image never seed two means).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_choice, check_in_range, check_matrix, check_positive_int
from protogmm.prototypes.base import PrototypeSet
from protogmm.prototypes.kmeans import kmeans
from protogmm.schedules import cosine_ramp

Covariance = Literal["diagonal", "isotropic"]
Forgetting = Literal["responsibility", "time", "none"]
Mixing = Literal["counts", "uniform"]
Anneal = Literal["means", "joint"]

# Counts below this are treated as empty when dividing sufficient statistics.
_TINY_COUNT = 1e-12
# Statistics that a merge adds up and a split halves (all per component, first dim K).
_MASS_BUFFERS = ("stat_count", "stat_sum", "var_count", "var_sum", "stat_sq", "mix_count")


def project_to_sphere(x: Tensor) -> Tensor:
    """L2-normalise the rows of ``x`` (float32 or float64) without overflow for huge entries.

    Rows are first divided by their largest absolute entry, so ``||x||^2`` cannot overflow;
    all-zero rows stay zero.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return F.normalize(x / scale, dim=1)


def _distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def bhattacharyya_coefficient(
    mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor
) -> Tensor:
    """Overlap ``exp(-D_B)`` in ``(0, 1]`` of pairs of diagonal (or isotropic) Gaussians.

    ``D_B = 1/8 sum_j (mu_aj - mu_bj)^2 / v_j + 1/2 sum_j ln(v_j / sqrt(v_aj v_bj))`` with
    ``v = (v_a + v_b) / 2`` (Bhattacharyya, 1943). Rows are pairs: means ``[P, d]``,
    variances ``[P, d]`` or ``[P]`` (isotropic, one variance for all ``d`` dimensions).
    """
    dim = mean_a.shape[1]
    var = 0.5 * (var_a + var_b)
    sq = (mean_a - mean_b) ** 2
    log_ratio = torch.log(var) - 0.5 * (torch.log(var_a) + torch.log(var_b))
    if var.ndim == 1:
        distance = 0.125 * sq.sum(dim=1) / var + 0.5 * dim * log_ratio
    else:
        distance = 0.125 * (sq / var).sum(dim=1) + 0.5 * log_ratio.sum(dim=1)
    return torch.exp(-distance)


#: The first round's mixture as options of today's :class:`OnlineGMM`: plain online EM with
#: the whole posterior annealed, the initial variance of all embeddings, one k-means run of 5
#: iterations on the first batch, a fixed floor and a per-step mixing discount, no split and
#: merge (the ablation baseline of ``benchmarks/mixture_recovery.py`` and ``data_sets.py``).
PLAIN_ANNEALED_EM: dict[str, Any] = {
    "anneal": "joint",
    "init_variance": "global",
    "init_samples": 0,
    "init_restarts": 1,
    "kmeans_iters": 5,
    "var_floor": 1e-4,
    "mixing_eta": 0.98,
    "merge_overlap": None,
    "reseed_min_share": None,
}


class OnlineGMM(PrototypeSet):
    """Online Gaussian mixture whose normalised means are the (decoupled) prototypes.

    The mixture holds buffers only: no parameters, no optimizer state, no gradient. Teacher
    and student share one instance (paper Fig. 2b); :meth:`update` fits it to the teacher's
    embeddings before the student's loss is computed (paper eq. 2-3), and :meth:`forward`
    scores embeddings against the fixed prototypes, differentiably in the embeddings only.

    Everything is computed in float32, also under autocast, and chunked over K so that no
    ``[N, K, d]`` tensor is ever built (the E-step is one ``N x K x 2d`` matrix product).

    Args:
        num_prototypes: K, the number of mixture components (= prototypes).
        dim: d, the embedding dimension.
        covariance: ``"diagonal"`` (per-component, per-dimension variances) or
            ``"isotropic"`` (one variance per component).
        forgetting: ``"responsibility"`` (``lambda_k = eta ** n_k``: a component forgets as
            much as it learns and an idle one keeps its estimate), ``"time"`` (``lambda = eta``
            for every component each step, Sato & Ishii 2000) or ``"none"`` (``lambda = 1``).
        eta: retention in (0, 1]; per unit of responsibility for ``"responsibility"`` (memory
            about ``-1 / ln(eta)`` samples per component), per step for ``"time"``.
        mixing: ``"counts"`` (``pi`` from discounted counts) or ``"uniform"`` (``pi = 1/K``,
            an equipartition prior as Sinkhorn-Knopp imposes; the counts are still kept to
            find stranded components).
        mixing_memory: how many expected hits of a component (``N / K`` per step for a
            global batch of ``N`` rows) the mixing counts remember: the per-step discount is
            ``exp(-(N / K) / mixing_memory)``. A per-step discount independent of ``N / K``
            (the former default ``mixing_eta = eta``) remembers less than one hit per
            component at large K, so ``pi`` is noise and a few components take all the
            weight (measured: 40 of 4,096 held 99.999 %).
        mixing_eta: a fixed per-step discount of the mixing counts instead (None: from
            ``mixing_memory``; 1 when ``forgetting="none"``).
        anneal: ``"means"`` (the tempered posterior estimates the means and weights, the
            untempered one the variances) or ``"joint"`` (the tempered posterior estimates
            everything: classic deterministic annealing, which merges the means while beta
            is small).
        beta0: the annealing inverse temperature at step 0, in (0, 1].
        anneal_steps: steps of the cosine ramp of beta from ``beta0`` to 1 (0: no annealing).
        var_floor: the variance floor ``sigma^2_min`` of the M-step; None: ``1e-2 / d``, one
            hundredth of the per-dimension variance of embeddings spread over the sphere (a
            fixed ``1e-4`` is below that by ``d / 100``, so at ``d = 128`` a component at the
            floor gains ``d/2 ln 78 = 279`` nats of log-determinant over a broad one).
        n_init: pseudo-count given to each component at initialisation.
        init_samples: embeddings collected before initialising (k-means); None: K, at least
            one per component (from fewer rows, the extra means are jittered copies of rows,
            near-duplicates by construction); 0: the first batch, whatever its size. While
            collecting, :meth:`update` returns uniform responsibilities.
        kmeans_iters: Lloyd iterations after the k-means++ seeding.
        init_restarts: k-means runs at initialisation; the lowest inertia is kept.
        init_variance: the initial variance of every component: ``"pooled"`` within the
            k-means clusters, or ``"global"``, the variance of all the embeddings (the former
            default: it includes the spread between clusters, so the first E-steps assign
            every embedding to every component).
        kmeanspp_max_seeds: above this K the sequential k-means++ seeding is replaced by a
            random choice of distinct embeddings (k-means++ costs K sequential passes).
        merge_overlap: merge two components when the Bhattacharyya coefficient of their
            densities exceeds this (two components sharing one cluster: about 0.7; two
            clusters a few standard deviations apart: below 0.1). Candidate pairs are each
            batch row's two most likely components, so the cost stays linear in K. None:
            never merge.
        reseed_min_share: a component whose mixing weight fell below this fraction of its
            expected share ``1/K`` is stranded and re-seeded (None: never). With the
            default ``mixing_memory`` a healthy component falls that low with probability
            about ``exp(-19)``; a component that gets nothing does after about
            ``3 mixing_memory K / N`` steps.
        chunk_size: components per chunk of the E-step and statistics products.
        center_momentum: if set, the mixture lives on *centred* embeddings: a running mean
            ``m`` of the (unit) embeddings is kept (EMA with this momentum) and every input,
            in :meth:`update` and in :meth:`forward`, is mapped to ``(h - m) / ||h - m||``.
            None: no centring.
        seed: seed of the generator used for initialisation (independent of the global RNG,
            so fitting the mixture does not perturb training's random stream).
    """

    decoupled = True

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        *,
        covariance: Covariance = "diagonal",
        forgetting: Forgetting = "responsibility",
        eta: float = 0.98,
        mixing: Mixing = "counts",
        mixing_memory: float = 20.0,
        mixing_eta: float | None = None,
        anneal: Anneal = "means",
        beta0: float = 0.1,
        anneal_steps: int = 1000,
        var_floor: float | None = None,
        n_init: float = 1.0,
        init_samples: int | None = None,
        kmeans_iters: int = 10,
        init_restarts: int = 3,
        init_variance: Literal["pooled", "global"] = "pooled",
        kmeanspp_max_seeds: int = 4096,
        merge_overlap: float | None = 0.5,
        reseed_min_share: float | None = 0.05,
        chunk_size: int = 4096,
        center_momentum: float | None = None,
        seed: int = 0,
    ) -> None:
        check_positive_int("num_prototypes", num_prototypes)
        check_positive_int("dim", dim)
        super().__init__(num_prototypes, dim)
        self.covariance = check_choice("covariance", covariance, ("diagonal", "isotropic"))
        self.forgetting = check_choice("forgetting", forgetting, ("responsibility", "time", "none"))
        self.mixing = check_choice("mixing", mixing, ("counts", "uniform"))
        self.anneal = check_choice("anneal", anneal, ("means", "joint"))
        self.eta = check_in_range("eta", eta, 0.0, 1.0, low_inclusive=False)
        self.mixing_memory = check_in_range(
            "mixing_memory", mixing_memory, 0.0, math.inf, low_inclusive=False
        )
        if mixing_eta is None and forgetting == "none":
            mixing_eta = 1.0
        if mixing_eta is not None:
            check_in_range("mixing_eta", mixing_eta, 0.0, 1.0, low_inclusive=False)
        self.mixing_eta = mixing_eta
        self.beta0 = check_in_range("beta0", beta0, 0.0, 1.0, low_inclusive=False)
        self.anneal_steps = check_positive_int("anneal_steps", anneal_steps, minimum=0)
        # None-valued options are reported as None by settings() (they resolve from K or d),
        # so runs of any K, d share one record of the defaults.
        if var_floor is not None:
            check_in_range("var_floor", var_floor, 0.0, math.inf, low_inclusive=False)
        self.var_floor = var_floor
        self._var_floor = 1e-2 / dim if var_floor is None else var_floor
        self.n_init = check_in_range("n_init", n_init, 0.0, math.inf, low_inclusive=False)
        if init_samples is not None:
            check_positive_int("init_samples", init_samples, minimum=0)
        self.init_samples = init_samples
        self._init_rows = num_prototypes if init_samples is None else init_samples
        self.init_variance = check_choice("init_variance", init_variance, ("pooled", "global"))
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        self.init_restarts = check_positive_int("init_restarts", init_restarts)
        self.kmeanspp_max_seeds = check_positive_int("kmeanspp_max_seeds", kmeanspp_max_seeds)
        if merge_overlap is not None:
            check_in_range("merge_overlap", merge_overlap, 0.0, 1.0, low_inclusive=False)
        self.merge_overlap = merge_overlap
        if reseed_min_share is not None:
            check_in_range("reseed_min_share", reseed_min_share, 0.0, 1.0, low_inclusive=False)
        self.reseed_min_share = reseed_min_share
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if center_momentum is not None:
            check_in_range("center_momentum", center_momentum, 0.0, 1.0, high_inclusive=False)
        self.center_momentum = center_momentum
        self.seed = seed

        k, d = num_prototypes, dim
        var_shape = (k, d) if covariance == "diagonal" else (k,)
        # Before initialisation the means are random unit vectors, so forward() is defined.
        init_generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", F.normalize(torch.randn(k, d, generator=init_generator)))
        self.register_buffer("var", torch.full(var_shape, 1.0 / d))
        self.register_buffer("stat_count", torch.full((k,), n_init))  # N_k
        self.register_buffer("stat_sum", self.mean * n_init)  # S_k
        self.register_buffer("var_count", torch.full((k,), n_init))  # N'_k
        self.register_buffer("var_sum", self.mean * n_init)  # S'_k
        self.register_buffer("stat_sq", (self.var + self._mean_sq(self.mean)) * n_init)  # Q_k
        self.register_buffer("mix_count", torch.full((k,), n_init))  # m_k
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_reseeded", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_merged", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("init_buffer", torch.zeros(self._init_rows, d))
        self.register_buffer("init_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("embedding_center", torch.zeros(d))
        #: Components whose mean was moved by a split or merge in the last update; hosts
        #: with per-component state (DINO's centre) reset theirs (not saved: per step).
        self.register_buffer("moved", torch.zeros(k, dtype=torch.bool), persistent=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Mixtures saved before the variance statistics were kept apart (and with the
        # idle-step re-seeding) load with N' = N, S' = S: identical once beta reaches 1.
        for new, old in (("var_count", "stat_count"), ("var_sum", "stat_sum")):
            if prefix + new not in state_dict and prefix + old in state_dict:
                state_dict[prefix + new] = state_dict[prefix + old].clone()
        if prefix + "num_merged" not in state_dict and prefix + "num_steps" in state_dict:
            state_dict[prefix + "num_merged"] = torch.zeros((), dtype=torch.long)
        state_dict.pop(prefix + "idle_steps", None)
        # Once initialised, the init buffer is spent: a mixture saved under another
        # init_samples (the former default was 0, an empty buffer) loads into this one.
        saved_buffer = state_dict.get(prefix + "init_buffer")
        initialized = state_dict.get(prefix + "initialized")
        if (
            saved_buffer is not None
            and initialized is not None
            and bool(initialized)
            and saved_buffer.shape != self.init_buffer.shape
        ):
            state_dict[prefix + "init_buffer"] = torch.zeros_like(self.init_buffer)
            state_dict[prefix + "init_filled"] = torch.tensor(self._init_rows)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------------ read-only state
    @property
    def means(self) -> Tensor:
        """``[K, d]`` component means ``mu_k = S_k / N_k`` (inside the unit ball)."""
        return self.mean.detach()

    @property
    def variances(self) -> Tensor:
        """``[K, d]`` (diagonal) or ``[K]`` (isotropic) component variances."""
        return self.var.detach()

    @property
    def mixing_weights(self) -> Tensor:
        """``[K]`` mixing weights ``pi_k``, summing to 1."""
        if self.mixing == "uniform":
            return torch.full_like(self.mix_count, 1.0 / self.num_prototypes)
        return self.component_shares

    @property
    def component_shares(self) -> Tensor:
        """``[K]`` discounted share of the responsibility each component received lately.

        Equal to :attr:`mixing_weights` with ``mixing="counts"``; kept under ``"uniform"``
        too, where it finds stranded components.
        """
        return self.mix_count / self.mix_count.sum().clamp_min(_TINY_COUNT)

    @property
    def variance_floor(self) -> float:
        """The M-step's variance floor as resolved (``var_floor``, or ``1e-2 / d``)."""
        return self._var_floor

    @property
    def step(self) -> int:
        """Number of :meth:`update` calls so far (the annealing clock)."""
        return int(self.num_steps)

    @property
    def beta(self) -> float:
        """The annealing inverse temperature ``beta_t`` used by the next E-step."""
        return cosine_ramp(self.step, self.anneal_steps, self.beta0, 1.0)

    def prototypes(self) -> Tensor:
        """``[K, d]`` unit-norm prototypes ``c_k = mu_k / ||mu_k||`` (no gradient)."""
        return F.normalize(self.mean.detach(), dim=1)

    # ------------------------------------------------------------------ scoring
    def forward(self, z: Tensor) -> Tensor:
        """Cosine scores ``[B, K]`` of embeddings ``z`` ``[B, d]`` against the prototypes.

        Differentiable in ``z``; the prototypes are constants (no gradient reaches the
        mixture). Computed in float32 regardless of autocast.
        """
        check_matrix("z", z, cols=self.dim, finite=False)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=1)
            if self.center_momentum is not None:
                z = F.normalize(z - self.embedding_center, dim=1)
            return z @ self.prototypes().T

    @torch.no_grad()
    def log_joint(self, h: Tensor) -> Tensor:
        """``[N, K]`` unnormalised log posterior ``log pi_k + log N(h | mu_k, Sigma_k)``.

        The constant ``-d/2 log(2 pi)`` is dropped (it cancels in every softmax over k).
        ``h`` is projected onto the unit sphere first.
        """
        h = self._check_embeddings(h)
        return self._log_joint(h)

    @torch.no_grad()
    def responsibilities(self, h: Tensor) -> Tensor:
        """``[N, K]`` annealed posterior ``softmax_k(beta_t log rho_ik)`` at the current step."""
        h = self._check_embeddings(h)
        if not bool(self.initialized):
            return torch.full(
                (h.shape[0], self.num_prototypes), 1.0 / self.num_prototypes, device=h.device
            )
        return torch.softmax(self.beta * self._log_joint(h), dim=1)

    # ------------------------------------------------------------------ estimation
    @torch.no_grad()
    def update(self, h: Tensor) -> Tensor:
        """One online-EM step on teacher embeddings ``h`` ``[N, d]`` (paper eq. 2).

        Returns:
            The ``[N, K]`` annealed responsibilities of ``h`` under the mixture *before* this
            step's M-step, i.e. exactly what :meth:`responsibilities` returned before the
            call. Hosts with ``targets="posterior"`` use them as teacher targets, so the
            E-step is never computed twice.
        """
        # All of it in float32 under autocast too: the statistics' product (and the k-means
        # of the initialisation) would otherwise run in bf16/fp16.
        device_type = h.device.type if isinstance(h, Tensor) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self._update(h)

    def _update(self, h: Tensor) -> Tensor:
        h = self._check_embeddings(h, update_center=True)
        self.moved.zero_()
        if not bool(self.initialized):
            if not self._collect_for_init(h):
                self.num_steps += 1
                return torch.full(
                    (h.shape[0], self.num_prototypes), 1.0 / self.num_prototypes, device=h.device
                )
        # 1. E-step: tempered responsibilities for the means and weights; for the variances
        #    the untempered ones (anneal="means"), so soft assignments cannot inflate them.
        log_joint = self._log_joint(h)
        gamma = torch.softmax(log_joint * self.beta, dim=1)
        gamma_var = gamma
        if self.anneal == "means" and self.beta < 1.0:
            gamma_var = torch.softmax(log_joint, dim=1)
        # 2.-4. statistics, forgetting, M-step.
        self._accumulate(self._batch_statistics(h, gamma, gamma_var))
        self._m_step()
        # 5. split and merge.
        if self.merge_overlap is not None or self.reseed_min_share is not None:
            self._split_and_merge(h, log_joint)
        self.num_steps += 1
        return gamma

    # ------------------------------------------------------------------ internals
    def _check_embeddings(self, h: Tensor, update_center: bool = False) -> Tensor:
        """Validate ``h``, project it to the sphere and, if enabled, centre it."""
        check_matrix("h", h, cols=self.dim)
        h = project_to_sphere(h.to(self.mean.device)).to(self.mean.dtype)
        if self.center_momentum is None:
            return h
        if update_center:
            batch_mean = h.mean(dim=0)
            if _distributed_world_size() > 1:
                dist.all_reduce(batch_mean)
                batch_mean /= _distributed_world_size()
            if self.step == 0:  # start from the first batch's mean, not from the origin
                self.embedding_center.copy_(batch_mean)
            else:
                self.embedding_center.mul_(self.center_momentum).add_(
                    batch_mean, alpha=1.0 - self.center_momentum
                )
        return project_to_sphere(h - self.embedding_center)

    def _mean_sq(self, mean: Tensor) -> Tensor:
        """``mu^2`` per dimension (diagonal) or ``||mu||^2 / d`` per component (isotropic)."""
        if self.covariance == "diagonal":
            return mean * mean
        return (mean * mean).sum(dim=1) / self.dim

    def _log_joint(self, h: Tensor) -> Tensor:
        """Chunked E-step products: ``[N, K]`` of ``log pi + log N`` (constant dropped).

        Diagonal: ``sum_j (h_j - mu_j)^2 / var_j = [h^2, h] @ [1/var, -2 mu/var]^T + sum mu^2/var``,
        one ``N x K x 2d`` product. Isotropic: one ``N x K x d`` product ``h @ mu^T``.
        """
        with torch.autocast(device_type=h.device.type, enabled=False):
            log_pi = torch.log(self.mixing_weights.clamp_min(1e-30))
            out = h.new_empty(h.shape[0], self.num_prototypes)
            if self.covariance == "diagonal":
                features = torch.cat([h * h, h], dim=1)
            else:
                h_sq = (h * h).sum(dim=1, keepdim=True)
            for lo in range(0, self.num_prototypes, self.chunk_size):
                hi = min(lo + self.chunk_size, self.num_prototypes)
                mean, var = self.mean[lo:hi], self.var[lo:hi]
                if self.covariance == "diagonal":
                    inv_var = 1.0 / var
                    weights = torch.cat([inv_var, -2.0 * mean * inv_var], dim=1)
                    const = (mean * mean * inv_var).sum(dim=1) + torch.log(var).sum(dim=1)
                    # log pi - (features @ weights^T + const) / 2, fused into one addmm
                    bias = (log_pi[lo:hi] - 0.5 * const)[None, :]
                    out[:, lo:hi] = torch.addmm(bias, features, weights.T, alpha=-0.5)
                else:
                    sq_dist = (h_sq - 2.0 * h @ mean.T + (mean * mean).sum(dim=1)).clamp_min(0.0)
                    logdet = self.dim * torch.log(var)
                    out[:, lo:hi] = log_pi[lo:hi] - 0.5 * (sq_dist / var + logdet)
            return out

    def _batch_statistics(self, h: Tensor, gamma: Tensor, gamma_var: Tensor) -> dict[str, Tensor]:
        """Batch statistics of the means and of the variances, summed over ranks.

        ``s = gamma^T h`` and ``[s', q] = gamma'^T [h, h^2]``: while annealing with
        ``anneal="means"`` three ``K x N x d`` products, one ``K x N x 2d`` product
        otherwise (isotropic: ``q_k = sum_i gamma'_ik ||h_i||^2 / d``).
        """
        if self.covariance == "diagonal":
            both = gamma_var.T @ torch.cat([h, h * h], dim=1)
            var_total, total_sq = both[:, : self.dim], both[:, self.dim :]
        else:
            var_total = gamma_var.T @ h
            total_sq = gamma_var.T @ ((h * h).sum(dim=1) / self.dim)
        separate = gamma_var is not gamma
        stats = {
            "count": gamma.sum(dim=0),
            "total": gamma.T @ h if separate else var_total,
            "var_count": gamma_var.sum(dim=0) if separate else None,
            "var_total": var_total if separate else None,
            "total_sq": total_sq,
        }
        stats = {name: value.contiguous() for name, value in stats.items() if value is not None}
        if _distributed_world_size() > 1:
            # Every rank must hold the same mixture: sum the statistics over the global batch.
            names = list(stats)
            flat = torch.cat([stats[name].flatten() for name in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for name, piece in zip(
                names, flat.split([stats[name].numel() for name in names]), strict=True
            ):
                stats[name] = piece.view(stats[name].shape)
        stats.setdefault("var_count", stats["count"])
        stats.setdefault("var_total", stats["total"])
        return stats

    def _retention(self, count: Tensor) -> Tensor:
        """``lambda_k`` of step 3 for batch counts ``count``."""
        if self.forgetting == "responsibility":
            return torch.pow(torch.tensor(self.eta, device=count.device), count)
        if self.forgetting == "time":
            return torch.full_like(count, self.eta)
        return torch.ones_like(count)

    def _accumulate(self, stats: dict[str, Tensor]) -> None:
        """Step 3: forget (per component) and add the batch's statistics."""
        retain = self._retention(stats["count"])
        self.stat_count.mul_(retain).add_(stats["count"])
        self.stat_sum.mul_(retain[:, None]).add_(stats["total"])
        retain_var = self._retention(stats["var_count"])
        self.var_count.mul_(retain_var).add_(stats["var_count"])
        self.var_sum.mul_(retain_var[:, None]).add_(stats["var_total"])
        self.stat_sq.mul_(retain_var[:, None] if self.covariance == "diagonal" else retain_var)
        self.stat_sq.add_(stats["total_sq"])
        if self.mixing_eta is not None:
            mixing_retain = self.mixing_eta
        else:  # remember mixing_memory expected hits: N / K of them per step
            rows = float(stats["count"].sum())
            mixing_retain = math.exp(-rows / (self.num_prototypes * self.mixing_memory))
        self.mix_count.mul_(mixing_retain).add_(stats["count"])

    def _m_step(self, components: Tensor | None = None) -> None:
        """``mu = S/N``, ``var = max(Q/N' - (S'/N')^2, floor)``; empty components keep theirs.

        Args:
            components: indices to re-estimate (all when None).
        """
        index = slice(None) if components is None else components
        count, var_count = self.stat_count[index], self.var_count[index]
        mean = self.stat_sum[index] / count.clamp_min(_TINY_COUNT)[:, None]
        var_mean = self.var_sum[index] / var_count.clamp_min(_TINY_COUNT)[:, None]
        if self.covariance == "diagonal":
            var = self.stat_sq[index] / var_count.clamp_min(_TINY_COUNT)[:, None]
            var = var - var_mean * var_mean
            keep_var = (var_count > _TINY_COUNT)[:, None]
        else:
            var = self.stat_sq[index] / var_count.clamp_min(_TINY_COUNT)
            var = var - self._mean_sq(var_mean)
            keep_var = var_count > _TINY_COUNT
        self.mean[index] = torch.where((count > _TINY_COUNT)[:, None], mean, self.mean[index])
        self.var[index] = torch.where(keep_var, var.clamp_min(self.variance_floor), self.var[index])

    # ------------------------------------------------------------------ initialisation
    def _collect_for_init(self, h: Tensor) -> bool:
        """Buffer ``h`` until ``init_samples`` rows are collected, then initialise from them and
        the rest of that batch. True once done."""
        if self._init_rows == 0:
            self._initialize_from(h)
            return True
        if _distributed_world_size() > 1:
            # The global batch fills the buffer, the same on every rank (a checkpoint's
            # fingerprint compares every buffer across ranks).
            h = _all_gather_rows(h)
        start = int(self.init_filled)
        take = min(self._init_rows - start, h.shape[0])
        self.init_buffer[start : start + take] = h[:take]
        self.init_filled += take
        if int(self.init_filled) < self._init_rows:
            return False
        # The rest of the batch that completed the buffer is used too.
        self._initialize_from(torch.cat([self.init_buffer, h[take:]]))
        return True

    def _initialize_from(self, x: Tensor) -> None:
        """Means by k-means (best of ``init_restarts``); variances pooled within clusters.

        The pooled within-cluster variance, not the variance of all embeddings: the latter
        includes the spread between clusters, and a first E-step that broad assigns every
        embedding to every component. Under ``torch.distributed`` rank 0 initialises and
        broadcasts, so every rank starts from the same mixture.
        """
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        fit = kmeans(
            x,
            self.num_prototypes,
            generator=generator,
            iters=self.kmeans_iters,
            restarts=self.init_restarts,
            kmeanspp_max_seeds=self.kmeanspp_max_seeds,
            chunk_size=self.chunk_size,
        )
        centre = fit.means[fit.labels] if self.init_variance == "pooled" else x.mean(dim=0)
        residual = (x - centre) ** 2
        pooled = residual.mean(dim=0) if self.covariance == "diagonal" else residual.mean()
        self.mean.copy_(fit.means)
        self.var.copy_(pooled.clamp_min(self.variance_floor).expand_as(self.var))
        for name in ("stat_count", "var_count", "mix_count"):
            getattr(self, name).fill_(self.n_init)
        self.stat_sum.copy_(fit.means * self.n_init)
        self.var_sum.copy_(fit.means * self.n_init)
        self.stat_sq.copy_((self.var + self._mean_sq(fit.means)) * self.n_init)
        if _distributed_world_size() > 1:
            for name in ("mean", "var", *_MASS_BUFFERS):
                dist.broadcast(getattr(self, name), src=0)
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ split and merge
    def _split_and_merge(self, h: Tensor, log_joint: Tensor) -> None:
        """Step 5: merge overlapping pairs, free stranded components, split to re-use them.

        Under ``torch.distributed`` every rank gathers the global batch's candidates (each
        row's two most likely components, their log joints, and the rows), so every rank
        plans the same moves as one process on the whole batch would.
        """
        best = log_joint.topk(min(2, self.num_prototypes), dim=1)
        top_values, top_indices = best.values, best.indices
        if _distributed_world_size() > 1:
            h, top_values, top_indices = (
                _all_gather_rows(tensor) for tensor in (h, top_values, top_indices)
            )
        merges, splits, targets = self._plan_moves(h, top_values, top_indices)
        for keep, drop in merges.tolist():
            for name in _MASS_BUFFERS:
                buffer = getattr(self, name)
                buffer[keep] += buffer[drop]
        if merges.numel():
            self._m_step(merges[:, 0])
            self.moved[merges[:, 0]] = True
            self.num_merged += merges.shape[0]
        for (free, parent), target in zip(splits.tolist(), targets, strict=True):
            self._split(parent, free, target)
        self.num_reseeded += splits.shape[0]

    def _plan_moves(
        self, h: Tensor, top_values: Tensor, top_indices: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Which pairs merge (``[M, 2]`` keep, drop) and which components split (``[S, 2]``
        free, parent) onto which targets (``[S, d]``).

        Candidate pairs are the two most likely components of each row (``top_indices``);
        a pair merges when its overlap exceeds ``merge_overlap``, most overlapping first,
        each component in at most one move. Targets are the rows worst explained by the
        mixture (lowest ``max_k log rho_ik``, ``top_values[:, 0]``), at most one per
        best-explaining component ("parent"), which the split halves. Moves are limited to
        the targets available: a merged component that could not be placed elsewhere would
        stay on its partner.
        """
        device = h.device
        busy: set[int] = set()  # components already in a move this step (host-side: no syncs)
        merge_pairs: list[tuple[int, int]] = []
        if self.merge_overlap is not None and self.num_prototypes > 1:
            pairs = top_indices.sort(dim=1).values.unique(dim=0)
            overlap = bhattacharyya_coefficient(
                self.mean[pairs[:, 0]],
                self.var[pairs[:, 0]],
                self.mean[pairs[:, 1]],
                self.var[pairs[:, 1]],
            )
            order = torch.argsort(overlap, descending=True)
            for index in order[overlap[order] > self.merge_overlap].tolist():
                a, b = pairs[index].tolist()
                if a in busy or b in busy:
                    continue
                if self.stat_count[b] > self.stat_count[a]:
                    a, b = b, a  # the heavier one survives
                merge_pairs.append((a, b))
                busy.update((a, b))
        stranded: list[int] = []
        if self.reseed_min_share is not None:
            share = self.component_shares * self.num_prototypes
            candidates = (share < self.reseed_min_share).nonzero().flatten()
            candidates = candidates[torch.argsort(share[candidates], stable=True)]
            stranded = [k for k in candidates.tolist() if k not in busy]
            busy.update(stranded)
        free_count = len(merge_pairs) + len(stranded)
        no_moves = (
            torch.zeros(0, 2, dtype=torch.long, device=device),
            torch.zeros(0, 2, dtype=torch.long, device=device),
            h.new_zeros(0, self.dim),
        )
        if free_count == 0:
            return no_moves
        parents = top_indices[:, 0].tolist()
        split_rows: list[int] = []
        split_parents: list[int] = []
        for row in torch.argsort(top_values[:, 0]).tolist():  # worst explained first
            p = parents[row]
            if p in busy:
                continue
            busy.add(p)  # one split per component and step
            split_rows.append(row)
            split_parents.append(p)
            if len(split_rows) == free_count:
                break
        merge_pairs = merge_pairs[: len(split_rows)]
        freed = [drop for _, drop in merge_pairs] + stranded
        freed = freed[: len(split_rows)]
        if not freed:
            return no_moves
        merges = torch.tensor(merge_pairs, dtype=torch.long, device=device).view(-1, 2)
        splits = torch.tensor(
            list(zip(freed, split_parents[: len(freed)], strict=True)),
            dtype=torch.long,
            device=device,
        ).view(-1, 2)
        return merges, splits, h[split_rows[: len(freed)]]

    def _split(self, parent: int, free: int, target: Tensor) -> None:
        """Give ``free`` half of ``parent``'s mass and variance, with its mean on ``target``.

        Halving every statistic of the parent keeps its mean and variance; the freed
        component forgets its own (a stranded one's tiny weight, a merged one's copy).
        """
        for name in _MASS_BUFFERS:
            buffer = getattr(self, name)
            buffer[parent] *= 0.5
            buffer[free] = buffer[parent]
        self.mean[free] = target
        self.var[free] = self.var[parent]
        self.stat_sum[free] = target * self.stat_count[free]
        self.var_sum[free] = target * self.var_count[free]
        self.stat_sq[free] = (self.var[free] + self._mean_sq(target[None])[0]) * self.var_count[
            free
        ]
        self.moved[free] = True

    #: The constructor arguments :meth:`settings` reports (all but K and d).
    SETTINGS = (
        "covariance",
        "forgetting",
        "eta",
        "mixing",
        "mixing_memory",
        "mixing_eta",
        "anneal",
        "beta0",
        "anneal_steps",
        "var_floor",
        "n_init",
        "init_samples",
        "kmeans_iters",
        "init_restarts",
        "init_variance",
        "kmeanspp_max_seeds",
        "merge_overlap",
        "reseed_min_share",
        "chunk_size",
        "center_momentum",
        "seed",
    )

    def settings(self) -> dict[str, Any]:
        """Every constructor argument as resolved (defaults included), JSON-serialisable.

        A run records them (``summary.json``) so that a later change of a default cannot make
        an old run pass for one made with the new default.
        """
        return {name: getattr(self, name) for name in self.SETTINGS}

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, dim={self.dim}, " + ", ".join(
            f"{name}={value}" for name, value in self.settings().items()
        )


def _all_gather_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank, in rank order (equal row counts per rank, as DINO assumes)."""
    gathered = [torch.empty_like(tensor) for _ in range(_distributed_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
