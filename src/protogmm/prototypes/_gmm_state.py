"""The online mixture's state: its buffers, old checkpoints' keys, and its initialisation.

What :class:`~protogmm.prototypes.OnlineGMM` holds between steps (``design.md`` §3): the
sufficient statistics of eq. 2 and the means and variances they give, the counters, the
buffer of embeddings collected before initialising, and the running centre. Before the
first :meth:`~protogmm.prototypes.OnlineGMM.update` the means are random unit vectors;
once ``init_samples`` rows have been seen they come from k-means, with the variances pooled
within its clusters. Checkpoints of earlier versions load through
:meth:`MixtureState._load_from_state_dict`. A mixin, as :mod:`protogmm.prototypes._gmm_em`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_matrix
from protogmm.prototypes._gmm_em import OnlineEMSteps, _all_gather_rows, _distributed_world_size
from protogmm.prototypes._gmm_maintenance import _MASS_BUFFERS
from protogmm.prototypes.kmeans import kmeans


def project_to_sphere(x: Tensor) -> Tensor:
    """L2-normalise the rows of ``x`` (float32 or float64) without overflow for huge entries.

    Rows are first divided by their largest absolute entry, so ``||x||^2`` cannot overflow;
    all-zero rows stay zero.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return F.normalize(x / scale, dim=1)


class MixtureState(OnlineEMSteps):
    """The buffers of :class:`~protogmm.prototypes.OnlineGMM` and how they start.

    Mixed into :class:`~protogmm.prototypes.OnlineGMM` (an ``nn.Module``), whose
    constructor sets the options read here and then calls :meth:`_register_state`.
    """

    # Set by OnlineGMM (declared here for readers of the mixin).
    seed: int
    step: int
    center_momentum: float | None
    embedding_center: Tensor
    n_init: float
    init_variance: str
    kmeans_iters: int
    init_restarts: int
    kmeanspp_max_seeds: int
    _init_rows: int
    init_buffer: Tensor
    init_filled: Tensor
    initialized: Tensor

    def _register_state(self, n_init: float) -> None:
        """Register every buffer, as before the first update (the ``state_dict`` keys).

        Args:
            n_init: the pseudo-count of every component, as the constructor was given it.
        """
        k, d = self.num_prototypes, self.dim
        var_shape = (k, d) if self.covariance == "diagonal" else (k,)
        # Before initialisation the means are random unit vectors, so forward() is defined.
        init_generator = torch.Generator().manual_seed(self.seed)
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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Mixtures saved before the variance statistics were kept apart (and with the
        # idle-step re-seeding) load with N' = N, S' = S: identical once beta reaches 1.
        for new, old in (("var_count", "stat_count"), ("var_sum", "stat_sum")):
            if prefix + new not in state_dict and prefix + old in state_dict:
                state_dict[prefix + new] = state_dict[prefix + old].clone()
        if prefix + "num_merged" not in state_dict and prefix + "num_steps" in state_dict:
            state_dict[prefix + "num_merged"] = torch.zeros((), dtype=torch.long)
        state_dict.pop(prefix + "idle_steps", None)
        # Once initialised, the init buffer is spent (released to [0, d]): a mixture saved
        # under another init_samples, or before the buffer was released, loads into this one.
        saved_buffer = state_dict.get(prefix + "init_buffer")
        initialized = state_dict.get(prefix + "initialized")
        if saved_buffer is not None and initialized is not None:
            if bool(initialized):
                if saved_buffer.shape != (self._init_rows, self.dim):
                    state_dict[prefix + "init_filled"] = torch.tensor(self._init_rows)
                self._release_init_buffer()
                state_dict[prefix + "init_buffer"] = self.init_buffer
            elif self.init_buffer.shape[0] != self._init_rows:  # released: collect again
                self.init_buffer = self.init_buffer.new_zeros(self._init_rows, self.dim)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _release_init_buffer(self) -> None:
        """Spent once initialised: a ``[0, d]`` buffer (``K x d`` no more), same key."""
        self.init_buffer = self.init_buffer.new_zeros(0, self.dim)

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
        embedding to every component. From one row per cluster (the default
        ``init_samples``: K rows) the residuals are all zero and every component starts at
        the variance floor: the first E-steps are then near-hard assignments, and the
        M-steps estimate the variances from the data (on planted clusters the median reaches
        its level within 5-20 updates; starting from the variance of all rows instead, it
        stayed 3x broader after 12). Under ``torch.distributed`` rank 0 initialises and
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
        self._release_init_buffer()
