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

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_matrix, check_positive_int
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
from protogmm.prototypes.mixture_options import MixtureOptions
from protogmm.schedules import cosine_ramp

#: Annealing steps of a mixture built outside a trainer (a trainer sets its schedule's).
_STANDALONE_ANNEAL_STEPS = 1000


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
        options: the mixture's options (:class:`MixtureOptions`, each documented there;
            None: the defaults).
        **overrides: options by name, applied over ``options``
            (``OnlineGMM(K, d, eta=0.9)``); ``anneal_steps=None`` resolves to 1000 here.

    Raises:
        ValueError: one line naming an unknown or out-of-range option.
    """

    decoupled = True

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        options: MixtureOptions | None = None,
        **overrides: Any,
    ) -> None:
        check_positive_int("num_prototypes", num_prototypes)
        check_positive_int("dim", dim)
        options = MixtureOptions.coerce(options)
        if overrides:
            unknown = sorted(set(overrides) - set(self.SETTINGS))
            if unknown:
                raise ValueError(
                    f"OnlineGMM: unknown option(s) {', '.join(map(repr, unknown))}; "
                    f"it takes {', '.join(self.SETTINGS)}"
                )
            options = dataclasses.replace(options, **overrides)  # checked again
        super().__init__(num_prototypes, dim)
        for name in self.SETTINGS:
            setattr(self, name, getattr(options, name))
        # None-valued options are reported as None by settings() (they resolve from K or d),
        # so runs of any K, d share one record of the defaults; the resolved values:
        for name in ("eta", "beta0", "mixing_memory", "n_init"):
            setattr(self, name, float(getattr(options, name)))
        if options.anneal_steps is None:
            self.anneal_steps = _STANDALONE_ANNEAL_STEPS
        if options.mixing_eta is None and options.forgetting == "none":
            self.mixing_eta = 1.0
        self._var_floor = 1e-2 / dim if options.var_floor is None else options.var_floor
        self._init_rows = num_prototypes if options.init_samples is None else options.init_samples
        # The buffers (steps 2-4's statistics, the init buffer, the centre): _gmm_state.py.
        self._register_state(self.n_init)

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
            return self.unit_inputs(z) @ self.prototypes().T

    def unit_inputs(self, z: Tensor) -> Tensor:
        """The unit vectors :meth:`forward` scores: ``z`` normalised in float32,
        then centred and normalised again under ``center_momentum``."""
        z = F.normalize(z.float(), dim=1)
        if self.center_momentum is not None:
            z = F.normalize(z - self.embedding_center, dim=1)
        return z

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
