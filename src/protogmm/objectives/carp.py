"""CARP: consistent assignment of views over random partitions (design.md §4).

Silva & Ramírez Rivera, "Representation Learning via Consistent Assignment of Views over
Random Partitions" (NeurIPS 2023), §3 (Eq. 1-5); the reference is ``CARPLoss`` and
``RandomPartition`` in sthalles/carp (``modules/``). Each step the K prototypes are split
by a fresh random permutation into ``M = K / P`` blocks of ``P``; within each block ``m``
the student and teacher assignments are ``p^m = softmax(s[block m] / tau)``, and

* consistency: ``L_c = mean over pairs (student view i, teacher view j != i) of
  mean_{m, b} -log <p_s^{m,i}_b, p_t^{m,j}_b>`` (the inner product clamped to
  ``[eps, 1 - eps]`` as in the reference);
* entropy term (the blocks used uniformly):
  ``L_e = mean_m KL(pbar^m || U_P) = mean_m [log P + sum_k pbar^m_k log pbar^m_k]``, with
  ``pbar^m`` the mean block assignment over every student and (detached) teacher row of
  the global batch;
* ``L = L_c + w L_e`` (CARP: ``w = 1``).

Our scores are cosines of L2-normalised embeddings against unit prototypes, in ``[-1, 1]``,
while CARP's head has no L2 bottleneck and its logits carry a learned scale; so the scores
are divided by a temperature ``tau`` (one for both networks, as CARP applies one softmax to
both). Ready teacher targets over all K (e.g. a GMM posterior) are also accepted: each block
then gets the target restricted to the block and renormalised, which is the same softmax
applied to ``log q``.

The partition of the ``t``-th call to :meth:`CARPLoss.next_partition` is a permutation drawn
from a generator seeded with ``(seed, t)``; the counter ``t`` is a buffer, so checkpoints
carry it, a resumed run draws the same partitions, and every DDP rank draws the same one
without a broadcast (the reference broadcasts rank 0's).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from protogmm._checks import check_in_range, check_positive_int

__all__ = ["CARPLoss", "CARPTerms"]


class CARPTerms(NamedTuple):
    """The CARP loss and its two terms (scalars)."""

    loss: Tensor
    consistency: Tensor
    entropy: Tensor


def _check_views(name: str, x: object, num_prototypes: int) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != num_prototypes:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape [views, batch, {num_prototypes}], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _global_sum(x: Tensor) -> Tensor:
    """Sum over DDP ranks with gradient (CARP's ``AllGather`` of the assignments)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x)
    return x


class CARPLoss(nn.Module):
    """CARP's random-partition consistency loss with the entropy (uniformity) regulariser.

    Args:
        num_prototypes: K.
        block_size: P, prototypes per block; must divide K (CARP: 512 of 65,536).
        temperature: ``tau`` dividing the cosine scores of both networks (> 0).
        entropy_weight: ``w`` of ``KL(mean p || uniform)`` (>= 0; CARP 1).
        seed: seed of the partition generator (independent of the global RNG).

    Attributes:
        num_partitions: buffer, the number of partitions drawn so far.

    Raises:
        ValueError: if ``block_size`` does not divide ``num_prototypes`` or is < 2, or a
            value is out of range; the message names the argument.
    """

    num_partitions: Tensor

    def __init__(
        self,
        num_prototypes: int,
        block_size: int,
        temperature: float = 0.1,
        entropy_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_prototypes = check_positive_int("num_prototypes", num_prototypes)
        self.block_size = check_positive_int("block_size", block_size, minimum=2)
        if num_prototypes % block_size:
            raise ValueError(
                f"block_size must divide num_prototypes={num_prototypes}, got {block_size}"
            )
        self.temperature = check_in_range(
            "temperature", temperature, 0.0, math.inf, low_inclusive=False
        )
        self.entropy_weight = check_in_range("entropy_weight", entropy_weight, 0.0, math.inf)
        self.seed = int(seed)
        self.register_buffer("num_partitions", torch.zeros((), dtype=torch.long))

    @property
    def num_blocks(self) -> int:
        """M = K / P."""
        return self.num_prototypes // self.block_size

    @torch.no_grad()
    def partition(self, index: int) -> Tensor:
        """The ``index``-th partition: ``[M, P]`` prototype indices (a permutation of 0..K-1)."""
        generator = torch.Generator().manual_seed(
            (self.seed * 0x9E3779B97F4A7C15 + int(index)) % (2**63)
        )
        order = torch.randperm(self.num_prototypes, generator=generator)
        return order.view(self.num_blocks, self.block_size).to(self.num_partitions.device)

    @torch.no_grad()
    def next_partition(self) -> Tensor:
        """A fresh partition for this step (advances the counter)."""
        blocks = self.partition(int(self.num_partitions))
        self.num_partitions += 1
        return blocks

    def block_probabilities(self, scores: Tensor, partition: Tensor) -> Tensor:
        """``[V, M, B, P]`` per-block softmax of ``scores / tau`` (``scores`` ``[V, B, K]``)."""
        logits = scores.to(torch.promote_types(scores.dtype, torch.float32)) / self.temperature
        grouped = logits[..., partition]  # [V, B, M, P]
        return F.softmax(grouped, dim=-1).transpose(1, 2)

    @staticmethod
    def block_targets(probs: Tensor, partition: Tensor) -> Tensor:
        """``[V, M, B, P]``: full-K targets ``probs`` ``[V, B, K]`` renormalised per block."""
        grouped = probs[..., partition]  # [V, B, M, P]
        grouped = grouped / grouped.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(grouped.dtype).tiny
        )
        return grouped.transpose(1, 2)

    def forward(
        self,
        student_scores: Tensor,
        partition: Tensor,
        teacher_scores: Tensor | None = None,
        *,
        teacher_probs: Tensor | None = None,
    ) -> CARPTerms:
        """CARP's loss for one partition.

        Args:
            student_scores: ``[V_s, B, K]`` student cosine scores of all views, the first
                ``V_t`` being the global views in the teacher's order.
            partition: ``[M, P]`` prototype indices (from :meth:`next_partition`).
            teacher_scores: ``[V_t, B, K]`` teacher cosine scores (softmax per block with
                ``tau``, as the student), or
            teacher_probs: ``[V_t, B, K]`` ready targets over all K (renormalised per block).

        Returns:
            :class:`CARPTerms` ``(loss, consistency, entropy)``, float32 (float64 for
            float64 input); teacher terms carry no gradient.

        Raises:
            ValueError: on bad shapes or a missing or doubled teacher input.
        """
        k = self.num_prototypes
        _check_views("student_scores", student_scores, k)
        if (teacher_scores is None) == (teacher_probs is None):
            raise ValueError("give exactly one of teacher_scores or teacher_probs")
        name, teacher = (
            ("teacher_scores", teacher_scores)
            if teacher_scores is not None
            else ("teacher_probs", teacher_probs)
        )
        _check_views(name, teacher, k)
        num_student, batch = student_scores.shape[:2]
        num_teacher = teacher.shape[0]
        if teacher.shape[1] != batch or num_teacher > num_student or num_student < 2:
            raise ValueError(
                f"{name} {tuple(teacher.shape)} must match the batch of student_scores "
                f"{tuple(student_scores.shape)}, with at most as many views (and >= 2 "
                "student views)"
            )
        if (
            not isinstance(partition, Tensor)
            or tuple(partition.shape) != (self.num_blocks, self.block_size)
            or partition.dtype != torch.long
        ):
            raise ValueError(
                f"partition must be a long tensor of shape {(self.num_blocks, self.block_size)}"
            )

        student = self.block_probabilities(student_scores, partition)  # [V_s, M, B, P]
        with torch.no_grad():
            if teacher_scores is not None:
                target = self.block_probabilities(teacher_scores.detach(), partition)
            else:
                target = self.block_targets(teacher_probs.detach(), partition)
            target = target.to(student.dtype)
        eps = torch.finfo(student.dtype).eps

        # Consistency: every (student view i, teacher view j != i) pair.
        total = student.new_zeros(())
        for j in range(num_teacher):
            for i in range(num_student):
                if i == j:
                    continue
                agreement = (student[i] * target[j]).sum(dim=-1)  # [M, B]
                total = total - agreement.clamp(eps, 1.0 - eps).log().mean()
        consistency = total / (num_teacher * num_student - num_teacher)

        # Entropy term: KL(mean assignment || uniform) per block, over all rows of all ranks.
        rows = torch.cat([student, target], dim=0)  # [V_s + V_t, M, B, P]
        block_sum = _global_sum(rows.sum(dim=(0, 2)))  # [M, P]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        mean = block_sum / (rows.shape[0] * rows.shape[2] * world)
        entropy = (
            math.log(self.block_size) + (mean * mean.clamp(eps, 1.0 - eps).log()).sum(dim=-1)
        ).mean()
        return CARPTerms(consistency + self.entropy_weight * entropy, consistency, entropy)

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, block_size={self.block_size}, "
            f"temperature={self.temperature}, entropy_weight={self.entropy_weight}, "
            f"seed={self.seed}"
        )
