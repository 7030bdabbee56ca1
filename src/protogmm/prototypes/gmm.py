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
   only; the variances come from the untempered posterior ``softmax_k(log rho_ik)`` (under
   ``anneal="joint"`` soft responsibilities inflate the variances until every mean sits at
   the data mean). With ``top_k`` only each row's top-k components by cosine are scored
   (truncated EM, :mod:`protogmm.prototypes._gmm_truncated`).
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
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_choice, check_in_range, check_matrix, check_positive_int
from protogmm.prototypes._gmm_em import _TINY_COUNT
from protogmm.prototypes._gmm_maintenance import SplitAndMerge
from protogmm.prototypes._gmm_maintenance import (  # re-exported from its former home
    bhattacharyya_coefficient as bhattacharyya_coefficient,
)
from protogmm.prototypes._gmm_state import MixtureState
from protogmm.prototypes._gmm_state import (  # re-exported from its former home
    project_to_sphere as project_to_sphere,
)
from protogmm.prototypes._gmm_truncated import MixtureUpdate, TruncatedEMSteps
from protogmm.prototypes.base import PrototypeSet
from protogmm.schedules import cosine_ramp

Covariance = Literal["diagonal", "isotropic"]
Forgetting = Literal["responsibility", "time", "none"]
Mixing = Literal["counts", "uniform"]
Anneal = Literal["means", "joint"]


def _optional_in_range(
    name: str, value: float | None, low: float, high: float, **bounds: bool
) -> float | None:
    """``value`` as given (None or in range, see :func:`check_in_range`), else ValueError.

    The value itself, not ``float(value)``: :meth:`OnlineGMM.settings` reports it as passed.
    """
    if value is not None:
        check_in_range(name, value, low, high, **bounds)
    return value


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


class OnlineGMM(MixtureState, TruncatedEMSteps, SplitAndMerge, PrototypeSet):
    """Online Gaussian mixture whose normalised means are the (decoupled) prototypes.

    The mixture holds buffers only: no parameters, no optimizer state, no gradient. Teacher
    and student share one instance (paper Fig. 2b); :meth:`update` fits it to the teacher's
    embeddings before the student's loss is computed (paper eq. 2-3), and :meth:`forward`
    scores embeddings against the fixed prototypes, differentiably in the embeddings only.

    Everything is computed in float32, also under autocast, and chunked over K so that no
    ``[N, K, d]`` tensor is ever built (the E-step is one ``N x K x 2d`` matrix product).

    The steps of :meth:`update` live in mixins, one module each, over this class's one set
    of buffers: steps 1-4 in :class:`~protogmm.prototypes._gmm_em.OnlineEMSteps`, step 5 in
    :class:`~protogmm.prototypes._gmm_maintenance.SplitAndMerge`, the buffers, old
    checkpoints' keys and the k-means initialisation in
    :class:`~protogmm.prototypes._gmm_state.MixtureState`.

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
        top_k: truncated EM: each row's E-step and statistics cover only its ``top_k``
            components by cosine score (the scores the targets need anyway); the others get
            zero responsibility for it. None: every component (the dense update, equal to
            ``top_k = K``). At least 2 (split and merge's candidate pairs).
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
        top_k: int | None = None,
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
        self.mixing_eta = _optional_in_range(
            "mixing_eta", mixing_eta, 0.0, 1.0, low_inclusive=False
        )
        self.beta0 = check_in_range("beta0", beta0, 0.0, 1.0, low_inclusive=False)
        self.anneal_steps = check_positive_int("anneal_steps", anneal_steps, minimum=0)
        # None-valued options are reported as None by settings() (they resolve from K or d),
        # so runs of any K, d share one record of the defaults.
        self.var_floor = _optional_in_range(
            "var_floor", var_floor, 0.0, math.inf, low_inclusive=False
        )
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
        self.merge_overlap = _optional_in_range(
            "merge_overlap", merge_overlap, 0.0, 1.0, low_inclusive=False
        )
        self.reseed_min_share = _optional_in_range(
            "reseed_min_share", reseed_min_share, 0.0, 1.0, low_inclusive=False
        )
        self.top_k = None if top_k is None else check_positive_int("top_k", top_k, minimum=2)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.center_momentum = _optional_in_range(
            "center_momentum", center_momentum, 0.0, 1.0, high_inclusive=False
        )
        self.seed = seed
        # The buffers (steps 2-4's statistics, the init buffer, the centre): _gmm_state.py.
        self._register_state(n_init)

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
        return self._unit_means()

    # ------------------------------------------------------------------ scoring
    def forward(self, z: Tensor) -> Tensor:
        """Cosine scores ``[B, K]`` of embeddings ``z`` ``[B, d]`` against the prototypes.

        Differentiable in ``z``; the prototypes are constants (no gradient reaches the
        mixture). Computed in float32 regardless of autocast.
        """
        check_matrix("z", z, cols=self.dim, min_rows=0, finite=False)  # 0 rows: no scores
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
            call (with ``top_k``: zero outside each row's candidates). Hosts with
            ``targets="posterior"`` use them as teacher targets, so the E-step is never
            computed twice.
        """
        return self.update_and_score(h, scores=False).posterior(self.num_prototypes)

    @torch.no_grad()
    def update_and_score(self, h: Tensor, scores: bool = True) -> MixtureUpdate:
        """:meth:`update`, returning also ``forward(h)`` after it (``scores``).

        With ``top_k`` the update computes the cosine scores of ``h`` anyway (they pick the
        candidates) and refreshes only the columns of the components it moved: the scores
        DINO's targets need cost no second ``N x d x K`` product. The posterior stays over
        the candidates (:meth:`MixtureUpdate.posterior` makes it ``[N, K]``).
        """
        # All of it in float32 under autocast too: the statistics' product (and the k-means
        # of the initialisation) would otherwise run in bf16/fp16.
        device_type = h.device.type if isinstance(h, Tensor) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            result = self._update(h)
            if scores and result.scores is None:
                result.scores = self(h)
            return result

    def _update(self, h: Tensor) -> MixtureUpdate:
        h = self._check_embeddings(h, update_center=True)
        self.moved.zero_()
        if not bool(self.initialized):
            if not self._collect_for_init(h):
                self.num_steps += 1
                uniform = 1.0 / self.num_prototypes
                return MixtureUpdate(h.new_full((h.shape[0], self.num_prototypes), uniform), None)
        if self.top_k is not None:  # steps 1-5 on each row's top-k candidates
            result = self._truncated_update(h)
            self.num_steps += 1
            return result
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
        return MixtureUpdate(gamma, None)

    # ------------------------------------------------------------------ internals
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
        "top_k",
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
