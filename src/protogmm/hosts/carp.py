"""CARP (Silva & Ramírez Rivera 2023): consistent assignments over random prototype blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protogmm._checks import check_in_range, check_positive_int
from protogmm.hosts.base import (
    NUM_GLOBAL_VIEWS,
    Host,
    StepContext,
    StepOutput,
    Targets,
    TeacherOutput,
)
from protogmm.hosts.ibot import _check_seed
from protogmm.objectives import CARPLoss
from protogmm.prototypes.kinds import Decoupled, PrototypeKind

__all__ = ["CARP"]


class CARP(Host):
    """CARP's step: each step draws a random partition of the K prototypes into blocks of
    P; within each block the student's assignment must match the teacher's (consistency over
    cross-view pairs), and the mean assignment of each block is pushed to uniform.

    Args:
        block_size: prototypes per block P; must divide K (CARP 512 of 65,536).
        temperature: temperature of the per-block softmax of both networks (our scores are
            cosines; CARP's unnormalised logits carry their own scale).
        entropy_weight: weight of KL(mean assignment || uniform) per block (1).
        seed: seed of the partitions, independent of the global RNGs.
    """

    name = "carp"

    def __init__(
        self,
        block_size: int = 128,
        temperature: float = 0.1,
        entropy_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("model.host.block_size", block_size, minimum=2)
        check_in_range("model.host.temperature", temperature, 0.0, math.inf, low_inclusive=False)
        check_in_range("model.host.entropy_weight", entropy_weight, 0.0, math.inf)
        _check_seed(seed)
        self.block_size = block_size
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.seed = seed
        self.objective: CARPLoss | None = None

    def setup(self, num_prototypes: int, kind: PrototypeKind, encoder: nn.Module) -> None:
        if num_prototypes % self.block_size:
            raise ValueError(
                f"model.host.block_size must divide model.num_prototypes={num_prototypes}, "
                f"got {self.block_size}"
            )
        if (
            isinstance(kind, Decoupled)
            and kind.targets == "posterior"
            and (kind.gmm.top_k or num_prototypes) < num_prototypes
        ):
            # Renormalised within a block, a truncated posterior is uniform in every block
            # that holds none of the row's top_k components: no gradient there.
            raise ValueError(
                "model.prototypes.targets 'posterior' with model.host CARP needs the dense "
                "posterior (--model.prototypes.gmm.top_k null): CARP renormalises it within "
                "each block, and a truncated one leaves most blocks uniform"
            )
        self.objective = CARPLoss(
            num_prototypes,
            self.block_size,
            temperature=self.temperature,
            entropy_weight=self.entropy_weight,
            seed=self.seed,
        )

    @torch.no_grad()
    def teacher_targets(
        self, ctx: StepContext, teacher: TeacherOutput, posterior: Tensor | None
    ) -> Targets:
        """The teacher's scores over the fixed prototypes, or the mixture's posterior."""
        prototypes = ctx.prototypes
        if posterior is not None and self.wants_posterior(prototypes.kind):
            probs = self.posterior_targets(prototypes.kind, posterior)
            return Targets(probs.view(NUM_GLOBAL_VIEWS, -1, probs.shape[-1]))
        # The scores the fit computed (truncated EM), else the teacher's own.
        scores, teacher.scores = teacher.scores, None
        if scores is None:
            scores = prototypes.teacher(teacher.embeddings)
        scores = scores.view(NUM_GLOBAL_VIEWS, -1, scores.shape[-1])
        return Targets(torch.softmax(scores / self.temperature, dim=-1), scores=scores)

    def student_loss(
        self, ctx: StepContext, views: list[Tensor], teacher: TeacherOutput, targets: Targets
    ) -> StepOutput:
        assert self.objective is not None
        # The student embeds every view and is scored against the same prototypes.
        scores = self.student_scores(ctx, views)
        # This step's random partition into blocks of P; per-block consistency over
        # cross-view pairs + KL(mean block assignment || uniform).
        partition = self.objective.next_partition()
        if targets.scores is not None:
            terms = self.objective(scores, partition, targets.scores)
        else:
            terms = self.objective(scores, partition, teacher_probs=targets.probs)
        return StepOutput(
            terms.loss,
            targets.probs,
            {
                "train/consistency": terms.consistency.detach(),
                "train/entropy_kl": terms.entropy.detach(),
            },
        )
