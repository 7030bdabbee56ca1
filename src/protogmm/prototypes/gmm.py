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

2. batch statistics ``n_k = sum_i gamma_ik``, ``s_k = sum_i gamma_ik h_i``,
   ``q_k = sum_i gamma_ik h_i^2`` (all-reduced over ranks under ``torch.distributed``);
3. forgetting (Celaya & Agostini, 2015, responsibility-based) ``lambda_k = eta ** n_k``,
   ``N_k <- lambda_k N_k + n_k`` and likewise for ``S_k``, ``Q_k``; mixing weights on separate
   counts with one global discount, ``m_k <- eta_pi m_k + n_k``;
4. M-step ``pi = m / sum(m)``, ``mu_k = S_k / N_k``,
   ``var_k = max(Q_k / N_k - mu_k^2, var_floor)``, prototypes ``c_k = mu_k / ||mu_k||``.
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
from protogmm.schedules import cosine_ramp

Covariance = Literal["diagonal", "isotropic"]
Forgetting = Literal["responsibility", "time", "none"]
Mixing = Literal["counts", "uniform"]

# Counts below this are treated as empty when dividing sufficient statistics.
_TINY_COUNT = 1e-12


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
        mixing: ``"counts"`` (``pi`` from counts with one global discount ``mixing_eta``) or
            ``"uniform"`` (``pi = 1/K``, an equipartition prior as Sinkhorn-Knopp imposes).
        mixing_eta: per-step discount of the mixing counts; defaults to ``eta`` (1 when
            ``forgetting="none"``).
        beta0: the annealing inverse temperature at step 0, in (0, 1].
        anneal_steps: steps of the cosine ramp of beta from ``beta0`` to 1 (0: no annealing).
        var_floor: the variance floor ``sigma^2_min`` of the M-step.
        n_init: pseudo-count given to each component at initialisation.
        init_samples: embeddings collected before initialising (k-means++ seeding plus Lloyd
            iterations); 0 means "the first batch, whatever its size". While collecting,
            :meth:`update` returns uniform responsibilities.
        kmeans_iters: Lloyd iterations after the k-means++ seeding.
        kmeanspp_max_seeds: above this K the sequential k-means++ seeding is replaced by a
            random choice of distinct embeddings (k-means++ costs K sequential passes).
        reseed_after: re-seed a component after this many consecutive steps with batch
            responsibility below ``reseed_min_mass`` (None: never, the paper's plain online
            EM). Stranded components are moved onto the worst-explained embeddings of the
            current batch, one component per embedding (longest idle first; the rest wait
            for later batches). On by default because, measured (BENCHMARKS.md, "Decoupling
            at small scale", 16 epochs at batch 32, K = 4096), a mixture that sees few
            embeddings per component strands most of them: their means freeze where
            initialisation put them while the encoder moves, and the decoupled encoder ends
            below the untrained one; re-seeding keeps the means on the current embeddings.
        reseed_min_mass: the responsibility mass under which a step counts as idle.
        chunk_size: components per chunk of the E-step and statistics products.
        center_momentum: if set, the mixture lives on *centred* embeddings: a running mean
            ``m`` of the (unit) embeddings is kept (EMA with this momentum) and every input,
            in :meth:`update` and in :meth:`forward`, is mapped to ``(h - m) / ||h - m||``.
            Early in training the teacher's embeddings sit in a small cap of the sphere;
            means fitted there are near-duplicates, while the centred embeddings spread
            over the whole sphere (DINO's logit centring is the same subtraction seen from
            the scores: ``<h, c> - <m, c> = <h - m, c>``). None: no centring.
        seed: seed of the generator used for initialisation and re-seeding (independent of
            the global RNG, so fitting the mixture does not perturb training's random stream).
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
        mixing_eta: float | None = None,
        beta0: float = 0.1,
        anneal_steps: int = 1000,
        var_floor: float = 1e-4,
        n_init: float = 1.0,
        init_samples: int = 0,
        kmeans_iters: int = 5,
        kmeanspp_max_seeds: int = 4096,
        reseed_after: int | None = 100,
        reseed_min_mass: float = 1e-3,
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
        self.eta = check_in_range("eta", eta, 0.0, 1.0, low_inclusive=False)
        if mixing_eta is None:
            mixing_eta = 1.0 if forgetting == "none" else eta
        self.mixing_eta = check_in_range("mixing_eta", mixing_eta, 0.0, 1.0, low_inclusive=False)
        self.beta0 = check_in_range("beta0", beta0, 0.0, 1.0, low_inclusive=False)
        self.anneal_steps = check_positive_int("anneal_steps", anneal_steps, minimum=0)
        self.var_floor = check_in_range("var_floor", var_floor, 0.0, math.inf, low_inclusive=False)
        self.n_init = check_in_range("n_init", n_init, 0.0, math.inf, low_inclusive=False)
        self.init_samples = check_positive_int("init_samples", init_samples, minimum=0)
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        self.kmeanspp_max_seeds = check_positive_int("kmeanspp_max_seeds", kmeanspp_max_seeds)
        if reseed_after is not None:
            check_positive_int("reseed_after", reseed_after)
        self.reseed_after = reseed_after
        self.reseed_min_mass = check_in_range("reseed_min_mass", reseed_min_mass, 0.0, math.inf)
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
        self.register_buffer("stat_sq", (self.var + self._mean_sq(self.mean)) * n_init)  # Q_k
        self.register_buffer("mix_count", torch.full((k,), n_init))  # m_k
        self.register_buffer("idle_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_reseeded", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("init_buffer", torch.zeros(init_samples, d))
        self.register_buffer("init_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("embedding_center", torch.zeros(d))

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
        return self.mix_count / self.mix_count.sum().clamp_min(_TINY_COUNT)

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
        if not bool(self.initialized):
            if not self._collect_for_init(h):
                self.num_steps += 1
                return torch.full(
                    (h.shape[0], self.num_prototypes), 1.0 / self.num_prototypes, device=h.device
                )
        gamma = torch.softmax(self._log_joint(h).mul_(self.beta), dim=1)
        count, total, total_sq = self._batch_statistics(h, gamma)
        self._forget_and_accumulate(count, total, total_sq)
        self._m_step()
        if self.reseed_after is not None:
            self._reseed_stranded(h, count)
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

    def _batch_statistics(self, h: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``n_k, s_k, q_k`` of the batch, summed over ranks when distributed.

        ``[s, q] = gamma^T [h, h^2]`` is one ``K x N x 2d`` product (isotropic: ``q_k`` is
        ``sum_i gamma_ik ||h_i||^2 / d``).
        """
        count = gamma.sum(dim=0)
        if self.covariance == "diagonal":
            both = gamma.T @ torch.cat([h, h * h], dim=1)
            total, total_sq = both[:, : self.dim].contiguous(), both[:, self.dim :].contiguous()
        else:
            total = gamma.T @ h
            total_sq = gamma.T @ ((h * h).sum(dim=1) / self.dim)
        if _distributed_world_size() > 1:
            # Every rank must hold the same mixture: sum the statistics over the global batch.
            flat = torch.cat([count, total.flatten(), total_sq.flatten()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            k, d = self.num_prototypes, self.dim
            count = flat[:k]
            total = flat[k : k + k * d].view(k, d)
            total_sq = flat[k + k * d :].view(total_sq.shape)
        return count, total, total_sq

    def _forget_and_accumulate(self, count: Tensor, total: Tensor, total_sq: Tensor) -> None:
        if self.forgetting == "responsibility":
            retain = torch.pow(torch.tensor(self.eta, device=count.device), count)
        elif self.forgetting == "time":
            retain = torch.full_like(count, self.eta)
        else:
            retain = torch.ones_like(count)
        self.stat_count.mul_(retain).add_(count)
        self.stat_sum.mul_(retain[:, None]).add_(total)
        retain_sq = retain[:, None] if self.covariance == "diagonal" else retain
        self.stat_sq.mul_(retain_sq).add_(total_sq)
        self.mix_count.mul_(self.mixing_eta).add_(count)

    def _m_step(self) -> None:
        """``mu = S/N``, ``var = max(Q/N - mu^2, floor)``; empty components keep their estimate."""
        has_mass = self.stat_count > _TINY_COUNT
        denom = self.stat_count.clamp_min(_TINY_COUNT)
        mean = self.stat_sum / denom[:, None]
        if self.covariance == "diagonal":
            var = self.stat_sq / denom[:, None] - mean * mean
            keep_var = has_mass[:, None]
        else:
            var = self.stat_sq / denom - self._mean_sq(mean)
            keep_var = has_mass
        self.mean.copy_(torch.where(has_mass[:, None], mean, self.mean))
        self.var.copy_(torch.where(keep_var, var.clamp_min(self.var_floor), self.var))

    # ------------------------------------------------------------------ initialisation
    def _collect_for_init(self, h: Tensor) -> bool:
        """Buffer ``h`` until ``init_samples`` are collected; initialise then. True once done."""
        if self.init_samples == 0:
            self._initialize_from(h)
            return True
        start = int(self.init_filled)
        take = min(self.init_samples - start, h.shape[0])
        self.init_buffer[start : start + take] = h[:take]
        self.init_filled += take
        if int(self.init_filled) < self.init_samples:
            return False
        self._initialize_from(self.init_buffer)
        return True

    def _initialize_from(self, x: Tensor) -> None:
        """Means from k-means++ seeds and Lloyd iterations over ``x``; shared variances.

        Under ``torch.distributed`` rank 0 initialises and broadcasts, so every rank starts
        from the same mixture.
        """
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        means = self._seed_means(x, generator)
        for _ in range(self.kmeans_iters):
            means = self._lloyd_step(x, means)
        if self.covariance == "diagonal":
            var = (
                x.var(dim=0, unbiased=False)
                .clamp_min(self.var_floor)
                .expand(self.num_prototypes, -1)
            )
        else:
            var = (
                x.var(dim=0, unbiased=False)
                .mean()
                .clamp_min(self.var_floor)
                .expand(self.num_prototypes)
            )
        self.mean.copy_(means)
        self.var.copy_(var)
        self.stat_count.fill_(self.n_init)
        self.mix_count.fill_(self.n_init)
        self.stat_sum.copy_(means * self.n_init)
        self.stat_sq.copy_((self.var + self._mean_sq(means)) * self.n_init)
        if _distributed_world_size() > 1:
            for buffer in (
                self.mean,
                self.var,
                self.stat_count,
                self.mix_count,
                self.stat_sum,
                self.stat_sq,
            ):
                dist.broadcast(buffer, src=0)
        self.initialized.fill_(True)

    def _seed_means(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """K initial means: k-means++ over the distinct rows of ``x`` where possible.

        When K exceeds the number of rows (or ``kmeanspp_max_seeds``), the remaining means
        are rows of ``x`` drawn at random plus a small jitter, projected to the sphere, so
        every component starts inside the data's cap rather than far from any data.
        """
        k, n = self.num_prototypes, x.shape[0]
        n_seeds = min(k, n)
        if n_seeds <= self.kmeanspp_max_seeds:
            index = self._kmeanspp_indices(x, n_seeds, generator)
        else:
            index = torch.randperm(n, generator=generator, device=x.device)[:n_seeds]
        means = x[index]
        if k > n_seeds:
            extra = torch.randint(0, n, (k - n_seeds,), generator=generator, device=x.device)
            spread = x.std(dim=0, unbiased=False).mean().clamp_min(1e-3)
            noise = torch.randn(k - n_seeds, self.dim, generator=generator, device=x.device)
            means = torch.cat([means, project_to_sphere(x[extra] + 0.5 * spread * noise)])
        return means

    @staticmethod
    def _kmeanspp_indices(x: Tensor, n_seeds: int, generator: torch.Generator) -> Tensor:
        """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007).

        Each step draws ``2 + ln(K)`` candidates with probability proportional to the squared
        distance to the closest seed and keeps the one that lowers the total potential most
        (the variant scikit-learn uses): plain k-means++ often leaves a small cluster unseeded.
        """
        n = x.shape[0]
        trials = 2 + int(math.log(max(n_seeds, 1)))
        first = int(torch.randint(0, n, (1,), generator=generator, device=x.device))
        chosen = [first]
        closest = ((x - x[first]) ** 2).sum(dim=1)
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
        return torch.tensor(chosen, device=x.device)

    def _lloyd_step(self, x: Tensor, means: Tensor) -> Tensor:
        """One k-means (Lloyd) step, chunked over K; empty clusters keep their mean."""
        best_score = torch.full((x.shape[0],), -math.inf, device=x.device)
        best_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for lo in range(0, self.num_prototypes, self.chunk_size):
            chunk = means[lo : lo + self.chunk_size]
            # argmin ||x - m||^2 = argmax (x.m - ||m||^2 / 2)
            score = x @ chunk.T - 0.5 * (chunk * chunk).sum(dim=1)
            value, index = score.max(dim=1)
            better = value > best_score
            best_score = torch.where(better, value, best_score)
            best_index = torch.where(better, index + lo, best_index)
        sums = torch.zeros_like(means).index_add_(0, best_index, x)
        counts = torch.bincount(best_index, minlength=self.num_prototypes).to(x.dtype)
        return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], means)

    # ------------------------------------------------------------------ re-seeding
    def _reseed_stranded(self, h: Tensor, count: Tensor) -> None:
        """Move components idle for ``reseed_after`` steps onto poorly explained embeddings."""
        idle = count < self.reseed_min_mass
        self.idle_steps.copy_(
            torch.where(idle, self.idle_steps + 1, torch.zeros_like(self.idle_steps))
        )
        stranded = (self.idle_steps >= self.reseed_after).nonzero().flatten()
        if stranded.numel() == 0:
            return
        # At most one component per embedding, longest idle first: re-seeding more components
        # than the batch has rows would stack several means on one point (exact duplicates,
        # i.e. collapse by construction). The others wait for the next steps.
        if stranded.numel() > h.shape[0]:
            longest_idle = torch.argsort(self.idle_steps[stranded], descending=True, stable=True)
            stranded = stranded[longest_idle[: h.shape[0]]]
        # The worst-explained embeddings under the updated mixture: lowest max log joint.
        fit = self._log_joint(h).max(dim=1).values
        targets = h[torch.argsort(fit)[: stranded.numel()]]
        if _distributed_world_size() > 1:
            # Ranks see different embeddings: every rank takes rank 0's targets.
            dist.broadcast(targets, src=0)
        self.mean[stranded] = targets
        self.stat_sum[stranded] = targets * self.stat_count[stranded, None]
        self.stat_sq[stranded] = (self.var[stranded] + self._mean_sq(targets)) * (
            self.stat_count[stranded, None]
            if self.covariance == "diagonal"
            else self.stat_count[stranded]
        )
        self.idle_steps[stranded] = 0
        self.num_reseeded += stranded.numel()

    #: The constructor arguments :meth:`settings` reports (all but K and d).
    SETTINGS = (
        "covariance",
        "forgetting",
        "eta",
        "mixing",
        "mixing_eta",
        "beta0",
        "anneal_steps",
        "var_floor",
        "n_init",
        "init_samples",
        "kmeans_iters",
        "kmeanspp_max_seeds",
        "reseed_after",
        "reseed_min_mass",
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
