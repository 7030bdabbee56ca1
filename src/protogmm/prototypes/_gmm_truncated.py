"""Truncated EM (issue 20): the E-step and the statistics on each row's top-k candidates.

The dense update of :class:`~protogmm.prototypes.OnlineGMM` computes the log joint of every
row under every component (``N x K``, one product ``2d`` wide), and the statistics from the
dense ``[N, K]`` posterior (one more such product). With ``top_k = k`` the rows' cosine scores
against the prototypes, which DINO's targets need anyway (one ``N x d x K`` product), pick each
row's ``k`` candidate components; the exact log joint (the same diagonal or isotropic
Gaussian), the annealed posterior and the sufficient statistics then run on those ``N x k``
pairs only (statistics by ``index_add`` onto the components some row chose), and forgetting
and the M-step touch only those components. The same scores, refreshed only in the columns
of the components that moved, are the teacher's scores against the updated prototypes.

The approximation: a component outside a row's top-k by cosine gets zero responsibility for
that row (also in split and merge's candidate pairs, each row's two most likely components
among its candidates). With ``top_k = K`` the update is the dense one (tested in float64
against it, every covariance, annealing, forgetting and split-and-merge option).

Under ``torch.distributed``, or with ``forgetting="time"`` (every component decays at every
step), the candidates' statistics are scattered into dense ``[K, ...]`` statistics and the
dense forgetting and M-step run, all-reduced as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm.prototypes._gmm_em import (
    OnlineEMSteps,
    _distributed_world_size,
    _summed_over_ranks,
)

#: Elements of the largest ``[rows, k, 2d]`` temporary of the candidates' E-step.
_PAIR_BLOCK = 1 << 22


@dataclass
class MixtureUpdate:
    """What one update of the mixture computed on its rows.

    Attributes:
        responsibilities: the annealed posterior of the mixture before the M-step: ``[N, K]``
            (dense update) or ``[N, k]`` over ``candidates`` (truncated).
        scores: ``[N, K]`` cosine scores of the rows against the *updated* prototypes (what
            ``forward`` returns after the update), or None where the update did not need them.
        candidates: truncated: ``[N, k]`` component index of each column of
            ``responsibilities``; None for the dense update.
    """

    responsibilities: Tensor
    scores: Tensor | None
    candidates: Tensor | None = None

    def posterior(self, num_prototypes: int) -> Tensor:
        """The ``[N, K]`` posterior (truncated: zero outside each row's candidates)."""
        if self.candidates is None:
            return self.responsibilities
        dense = self.responsibilities.new_zeros(self.responsibilities.shape[0], num_prototypes)
        return dense.scatter_(1, self.candidates, self.responsibilities)


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter of ``tensor`` (None where it keeps none)."""
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class TruncatedEMSteps(OnlineEMSteps):
    """Steps 1-4 on each row's ``top_k`` candidates, and the unit means kept between calls.

    Mixed into :class:`~protogmm.prototypes.OnlineGMM` (which sets ``top_k``, ``beta``,
    ``anneal``, ``merge_overlap``, ``reseed_min_share`` and the buffers).
    """

    # Set by OnlineGMM (declared here for readers of the mixin).
    top_k: int | None
    anneal: str
    beta: float
    merge_overlap: float | None
    reseed_min_share: float | None
    moved: Tensor

    # ------------------------------------------------------------------ unit means
    def _unit_means(self) -> Tensor:
        """``[K, d]`` unit means ``mu_k / ||mu_k||``, recomputed only when ``mean`` changed.

        Kept with the ``mean`` tensor it came from and that tensor's version counter, so any
        in-place change (an update, ``load_state_dict``) or a new tensor (``.to()``) is seen.
        The returned tensor is never modified afterwards (callers may keep it).
        """
        mean, cached = self.mean, self.__dict__.get("_unit_means_cache")
        version = _version(mean)
        if cached is not None and cached[0] is mean and version is not None:
            if cached[1] == version:
                return cached[2]
        unit = F.normalize(mean.detach(), dim=1)
        self.__dict__["_unit_means_cache"] = (mean, version, unit)
        return unit

    def _refresh_unit_means(self, stale: Tensor, components: Tensor) -> Tensor:
        """The unit means after an update that changed only ``components`` (indices) of a
        ``mean`` whose unit means were ``stale``: a new tensor, ``stale`` is left as it was."""
        fresh = stale.index_copy(0, components, F.normalize(self.mean.index_select(0, components)))
        self.__dict__["_unit_means_cache"] = (self.mean, _version(self.mean), fresh)
        return fresh

    # ------------------------------------------------------------------ the update
    def _truncated_update(self, h: Tensor) -> MixtureUpdate:
        """Steps 1-5 on each row's ``top_k`` candidates (``h``: unit rows ``[N, d]``)."""
        assert self.top_k is not None
        unit = self._unit_means()
        scores = h @ unit.T  # [N, K]: the product DINO's targets need anyway
        candidates = scores.topk(min(self.top_k, self.num_prototypes), dim=1).indices
        components, slots = torch.unique(candidates, return_inverse=True)
        # 1. E-step on the candidates: the exact log joint, tempered and untempered posterior.
        log_joint = self._candidate_log_joint(h, components, slots)
        gamma = torch.softmax(log_joint * self.beta, dim=1)
        gamma_var = gamma
        if self.anneal == "means" and self.beta < 1.0:
            gamma_var = torch.softmax(log_joint, dim=1)
        # 2.-4. statistics onto the chosen components, forgetting, M-step.
        stats = self._candidate_statistics(h, slots, components.numel(), gamma, gamma_var)
        sparse = _distributed_world_size() == 1 and self.forgetting != "time"
        if sparse:
            self._accumulate_at(components, _summed_over_ranks(stats))
            self._m_step(components)
        else:
            dense = {
                name: value.new_zeros(self.num_prototypes, *value.shape[1:]).index_copy_(
                    0, components, value
                )
                for name, value in stats.items()
                if value is not None
            }
            self._accumulate(_summed_over_ranks(dense))
            self._m_step()
        # 5. split and merge: each row's two most likely candidates.
        if self.merge_overlap is not None or self.reseed_min_share is not None:
            self._split_and_merge(h, log_joint, candidates)
        # The scores against the updated prototypes: only the moved columns change.
        if not sparse:
            return MixtureUpdate(gamma, h @ self._unit_means().T, candidates)
        changed = torch.cat([components, self.moved.nonzero().flatten()]).unique()
        unit = self._refresh_unit_means(unit, changed)
        scores.index_copy_(1, changed, h @ unit.index_select(0, changed).T)
        return MixtureUpdate(gamma, scores, candidates)

    def _candidate_log_joint(self, h: Tensor, components: Tensor, slots: Tensor) -> Tensor:
        """``[N, k]`` ``log pi + log N(h_i | mu_c, Sigma_c)`` of each row's candidates.

        ``components`` are the distinct candidates and ``slots`` ``[N, k]`` each candidate's
        position among them. Diagonal: per component ``w = [1/var, -2 mu/var]`` and
        ``c = sum mu^2/var + sum log var``, then one ``[h^2, h] . w`` per pair (a batched
        product over row blocks, so no ``[N, k, 2d]`` temporary exceeds :data:`_PAIR_BLOCK`).
        Isotropic: ``||h||^2 - 2 h.mu + ||mu||^2`` with one ``h.mu`` per pair.
        """
        mean, var = self.mean.index_select(0, components), self.var.index_select(0, components)
        log_pi = torch.log(self.mixing_weights.index_select(0, components).clamp_min(1e-30))
        if self.covariance == "diagonal":
            inv_var = 1.0 / var
            weights = torch.cat([inv_var, -2.0 * mean * inv_var], dim=1)
            const = (mean * mean * inv_var).sum(dim=1) + torch.log(var).sum(dim=1)
            features = torch.cat([h * h, h], dim=1)
        else:
            weights = mean
            const = (mean * mean).sum(dim=1)
            features = h
        n, k = slots.shape
        quad = h.new_empty(n, k)
        block = max(1, _PAIR_BLOCK // max(1, k * weights.shape[1]))
        for lo in range(0, n, block):
            rows = slice(lo, lo + block)
            pair = torch.bmm(weights[slots[rows]], features[rows, :, None])[:, :, 0]
            quad[rows] = pair
        if self.covariance == "diagonal":
            quad += const[slots]
            return log_pi[slots] - 0.5 * quad
        h_sq = (h * h).sum(dim=1, keepdim=True)
        sq_dist = (h_sq - 2.0 * quad + const[slots]).clamp_min(0.0)
        log_var = torch.log(var)
        return log_pi[slots] - 0.5 * (sq_dist / var[slots] + self.dim * log_var[slots])

    def _candidate_statistics(
        self, h: Tensor, slots: Tensor, size: int, gamma: Tensor, gamma_var: Tensor
    ) -> dict[str, Tensor | None]:
        """The batch statistics of :meth:`_batch_statistics`, for the ``size`` distinct
        candidates only (row ``j`` is ``components[j]``): each posterior is a sparse
        ``[size, N]`` matrix of ``N x k`` entries times ``[h, h^2, 1]`` (or ``[h, 1]``)."""
        n, k = slots.shape
        rows = torch.arange(n, device=h.device).repeat_interleave(k)
        index = torch.stack([slots.flatten(), rows])
        ones = h.new_ones(n, 1)
        if self.covariance == "diagonal":
            features = torch.cat([h, h * h, ones], dim=1)
        else:
            features = torch.cat([h, (h * h).sum(dim=1, keepdim=True) / self.dim, ones], dim=1)

        def summed(weight: Tensor, columns: Tensor) -> Tensor:
            """``sum_i weight_ic columns_i`` per candidate ``c``."""
            matrix = torch.sparse_coo_tensor(
                index, weight.flatten(), (size, n), check_invariants=False
            )
            return torch.sparse.mm(matrix, columns)

        both = summed(gamma_var, features)
        d = self.dim
        var_total, var_count = both[:, :d], both[:, -1]
        total_sq = both[:, d:-1] if self.covariance == "diagonal" else both[:, d]
        if gamma_var is gamma:
            return {"count": var_count, "total": var_total, "total_sq": total_sq}
        means = summed(gamma, torch.cat([h, ones], dim=1))
        return {
            "count": means[:, -1],
            "total": means[:, :d],
            "var_count": var_count,
            "var_total": var_total,
            "total_sq": total_sq,
        }

    def _accumulate_at(self, components: Tensor, stats: dict[str, Tensor]) -> None:
        """Step 3 on ``components`` only: the others got no responsibility, so with
        responsibility forgetting (``eta ** 0 = 1``) or none they keep their statistics;
        the mixing counts are discounted everywhere, as in :meth:`_accumulate`."""
        index = components

        def forget_and_add(name: str, retain: Tensor, batch: Tensor) -> None:
            buffer = getattr(self, name)
            kept = buffer.index_select(0, index)
            buffer.index_copy_(0, index, kept * retain.view(-1, *([1] * (kept.ndim - 1))) + batch)

        retain = self._retention(stats["count"])
        forget_and_add("stat_count", retain, stats["count"])
        forget_and_add("stat_sum", retain, stats["total"])
        retain_var = self._retention(stats["var_count"])
        forget_and_add("var_count", retain_var, stats["var_count"])
        forget_and_add("var_sum", retain_var, stats["var_total"])
        forget_and_add("stat_sq", retain_var, stats["total_sq"])
        self.mix_count.mul_(self._mixing_retention(stats["count"]))
        self.mix_count.index_add_(0, index, stats["count"])
