"""Step 5 of the online mixture's update: split and merge (Ueda et al., 2000, online).

The maintenance half of :class:`~protogmm.prototypes.OnlineGMM` (``design.md`` §3): two
components whose densities overlap (Bhattacharyya coefficient above ``merge_overlap``) are
merged into one, and a component whose mixing weight fell below ``reseed_min_share / K``
is stranded; each component so freed takes half of the mass of the component that best
explains one of the batch's worst-explained embeddings, with its mean on that embedding.
A mixin, as :mod:`protogmm.prototypes._gmm_em`: the buffers it moves are the mixture's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protogmm.prototypes._gmm_em import OnlineEMSteps, _all_gather_rows, _distributed_world_size

# Statistics that a merge adds up and a split halves (all per component, first dim K).
_MASS_BUFFERS = ("stat_count", "stat_sum", "var_count", "var_sum", "stat_sq", "mix_count")


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


class SplitAndMerge(OnlineEMSteps):
    """Step 5 of :meth:`OnlineGMM.update <protogmm.prototypes.OnlineGMM.update>`.

    Mixed into :class:`~protogmm.prototypes.OnlineGMM`, which sets ``merge_overlap`` and
    ``reseed_min_share`` and registers the buffers moved here (the mean, variance and
    :data:`_MASS_BUFFERS` of every component, the ``moved`` flags and the ``num_merged``,
    ``num_reseeded`` counters); merged components are re-estimated by the M-step of
    :class:`~protogmm.prototypes._gmm_em.OnlineEMSteps`.
    """

    # Set by OnlineGMM (declared here for readers of the mixin).
    merge_overlap: float | None
    reseed_min_share: float | None
    moved: Tensor
    num_merged: Tensor
    num_reseeded: Tensor
    component_shares: Tensor

    def _split_and_merge(
        self, h: Tensor, log_joint: Tensor, candidates: Tensor | None = None
    ) -> None:
        """Step 5: merge overlapping pairs, free stranded components, split to re-use them.

        Under ``torch.distributed`` every rank gathers the global batch's candidates (each
        row's two most likely components, their log joints, and the rows), so every rank
        plans the same moves as one process on the whole batch would. ``candidates``
        (truncated EM): the component of each column of ``log_joint`` (None: column k is
        component k).
        """
        best = log_joint.topk(min(2, log_joint.shape[1]), dim=1)
        top_values, top_indices = best.values, best.indices
        if candidates is not None:
            top_indices = candidates.gather(1, top_indices)
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
