"""Equipartition of teacher targets: Sinkhorn-Knopp balancing (SwAV, DINOv2).

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (NeurIPS 2020), §3.1 and Algorithm 1; DINOv2's ``sinkhorn_knopp_teacher``.
Given ``[N, K]`` logits, find the transport plan ``Q`` closest to ``exp(logits)`` whose
columns (prototypes) each carry mass ``1/K`` and whose rows (samples) each carry ``1/N``;
returned row-normalised, so each row is a target distribution over the K prototypes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from protogmm._checks import check_matrix, check_positive_int


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, num_iters: int = 3) -> Tensor:
    """Balanced targets from ``[N, K]`` logits (already divided by their temperature).

    Alternates ``num_iters`` times between normalising the columns to ``1/K`` and the rows
    to ``1/N`` (column sums all-reduced over ranks, so the batch is the global batch), in
    float32, starting from ``exp(logits - max)`` for stability.

    Args:
        logits: ``[N, K]`` scores; e.g. the GMM's ``log`` posterior or cosine scores / tau.
        num_iters: Sinkhorn iterations (SwAV and DINOv2 use 3).

    Returns:
        ``[N, K]`` float32 targets, each row summing to 1.
    """
    check_matrix("logits", logits, finite=False)
    check_positive_int("num_iters", num_iters)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        q = logits.float()
        world = _world_size()
        peak = q.max()
        if world > 1:
            # One shift for all ranks: per-rank shifts would scale each rank's samples
            # differently in the all-reduced column sums below.
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        q = torch.exp(q - peak).T  # [K, N]
        num_prototypes, num_samples = q.shape[0], q.shape[1] * world
        total = q.sum()
        if world > 1:
            dist.all_reduce(total)
        q = q / total.clamp_min(torch.finfo(q.dtype).tiny)
        for _ in range(num_iters):
            column_mass = q.sum(dim=1, keepdim=True)  # per prototype, over the global batch
            if world > 1:
                dist.all_reduce(column_mass)
            q = q / column_mass.clamp_min(torch.finfo(q.dtype).tiny) / num_prototypes
            q = q / q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
            q = q / num_samples
        q = q * num_samples
        return q.T
