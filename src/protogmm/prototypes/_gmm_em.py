"""Steps 1-4 of the online mixture's update: E-step, batch statistics, forgetting, M-step.

The estimation half of :class:`~protogmm.prototypes.OnlineGMM` (paper eq. 2, reconstructed
in ``design.md`` §3; the equations are in :mod:`protogmm.prototypes.gmm`'s docstring). It is
a mixin: the methods read and write the mixture's options and buffers, which
:class:`~protogmm.prototypes.OnlineGMM` defines, so that the class keeps one set of buffers
(and one ``state_dict``) while each step's code lives with its equation here.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

# Counts below this are treated as empty when dividing sufficient statistics.
_TINY_COUNT = 1e-12


def _distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank, in rank order (equal row counts per rank, as DINO assumes)."""
    gathered = [torch.empty_like(tensor) for _ in range(_distributed_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def _summed_over_ranks(stats: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The batch statistics summed over ranks (one all-reduce of one flat tensor).

    ``var_count`` and ``var_total`` may be None (the same as ``count`` and ``total``).
    """
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


class OnlineEMSteps:
    """Steps 1-4 of :meth:`OnlineGMM.update <protogmm.prototypes.OnlineGMM.update>`.

    Mixed into :class:`~protogmm.prototypes.OnlineGMM`, whose constructor sets the options
    (``covariance``, ``forgetting``, ``eta``, ``mixing_eta``, ``mixing_memory``,
    ``chunk_size``) and registers the buffers read here: the means ``mean`` and variances
    ``var``, and the sufficient statistics ``stat_count`` (``N_k``), ``stat_sum``
    (``S_k``), ``var_count`` (``N'_k``), ``var_sum`` (``S'_k``), ``stat_sq`` (``Q_k``) and
    ``mix_count`` (``m_k``).
    """

    # Set by OnlineGMM (declared here for readers of the mixin).
    num_prototypes: int
    dim: int
    covariance: str
    forgetting: str
    eta: float
    mixing_eta: float | None
    mixing_memory: float
    chunk_size: int
    mean: Tensor
    var: Tensor
    stat_count: Tensor
    stat_sum: Tensor
    var_count: Tensor
    var_sum: Tensor
    stat_sq: Tensor
    mix_count: Tensor
    mixing_weights: Tensor
    variance_floor: float

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
        return _summed_over_ranks(stats)

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
        self.mix_count.mul_(self._mixing_retention(stats["count"])).add_(stats["count"])

    def _mixing_retention(self, count: Tensor) -> float:
        """The mixing counts' discount for a step whose batch counts are ``count``."""
        if self.mixing_eta is not None:
            return self.mixing_eta
        # remember mixing_memory expected hits: N / K of them per step
        rows = float(count.sum())
        return math.exp(-rows / (self.num_prototypes * self.mixing_memory))

    def _m_step(self, components: Tensor | None = None) -> None:
        """``mu = S/N``, ``var = max(Q/N' - (S'/N')^2, floor)``; empty components keep theirs.

        Args:
            components: indices to re-estimate (all when None).
        """

        def take(buffer: Tensor) -> Tensor:
            return buffer if components is None else buffer.index_select(0, components)

        def put(buffer: Tensor, value: Tensor) -> None:
            if components is None:
                buffer.copy_(value)
            else:
                buffer.index_copy_(0, components, value)

        count, var_count = take(self.stat_count), take(self.var_count)
        mean = take(self.stat_sum) / count.clamp_min(_TINY_COUNT)[:, None]
        var_mean = take(self.var_sum) / var_count.clamp_min(_TINY_COUNT)[:, None]
        if self.covariance == "diagonal":
            var = take(self.stat_sq) / var_count.clamp_min(_TINY_COUNT)[:, None]
            var = var - var_mean * var_mean
            keep_var = (var_count > _TINY_COUNT)[:, None]
        else:
            var = take(self.stat_sq) / var_count.clamp_min(_TINY_COUNT)
            var = var - self._mean_sq(var_mean)
            keep_var = var_count > _TINY_COUNT
        put(self.mean, torch.where((count > _TINY_COUNT)[:, None], mean, take(self.mean)))
        put(self.var, torch.where(keep_var, var.clamp_min(self.variance_floor), take(self.var)))
