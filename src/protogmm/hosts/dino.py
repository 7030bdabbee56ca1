"""DINO (Caron et al. 2021): cross-view distillation of centred, sharpened teacher scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protogmm._checks import check_in_range
from protogmm.hosts.base import (
    NUM_GLOBAL_VIEWS,
    Host,
    StepContext,
    StepOutput,
    Targets,
    TeacherOutput,
    embed,
)
from protogmm.objectives import DINOLoss
from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.prototypes.kinds import Partial, PrototypeKind
from protogmm.schedules import linear_ramp

__all__ = ["DINO"]


class DINO(Host):
    """DINO's step (its ``main_dino.py`` train loop), against any prototype kind.

    The teacher embeds the two global views; its targets are the softmax of its centred
    scores at a low temperature (decoupled: optionally the mixture's posterior; partial:
    Sinkhorn-Knopp-balanced scores of the clustering layer); the student embeds every view
    and the loss is the cross-entropy over all (teacher view, other student view) pairs.

    Args:
        student_temperature: tau_s.
        teacher_temperature: tau_t at the end of its warm-up.
        warmup_teacher_temperature: tau_t at step 0.
        teacher_temperature_warmup_epochs: epochs of the linear tau_t warm-up.
        center_momentum: the centre's EMA momentum.
    """

    name = "dino"

    def __init__(
        self,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature_warmup_epochs: float = 0.0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        for key, value in (
            ("student_temperature", student_temperature),
            ("teacher_temperature", teacher_temperature),
            ("warmup_teacher_temperature", warmup_teacher_temperature),
        ):
            check_in_range(f"model.host.{key}", value, 0.0, math.inf, low_inclusive=False)
        check_in_range(
            "model.host.teacher_temperature_warmup_epochs",
            teacher_temperature_warmup_epochs,
            0.0,
            math.inf,
        )
        check_in_range("model.host.center_momentum", center_momentum, 0.0, 1.0)
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature_warmup_epochs = teacher_temperature_warmup_epochs
        self.center_momentum = center_momentum
        self.objective: DINOLoss | None = None

    def setup(self, num_prototypes: int, kind: PrototypeKind, encoder: nn.Module) -> None:
        self.objective = DINOLoss(
            num_prototypes,
            student_temperature=self.student_temperature,
            center_momentum=self.center_momentum,
        )

    def schedule_at(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        warmup_steps = int(self.teacher_temperature_warmup_epochs * steps_per_epoch)
        return {
            "teacher_temperature": linear_ramp(
                step, warmup_steps, self.warmup_teacher_temperature, self.teacher_temperature
            )
        }

    def teacher_targets(
        self, ctx: StepContext, teacher: TeacherOutput, posterior: Tensor | None
    ) -> Targets:
        # The scores the fit computed (truncated EM) serve the targets only: not kept
        # through the student's pass (a [2B, K] tensor).
        scores, teacher.scores = teacher.scores, None
        return Targets(self.cls_targets(ctx, teacher.embeddings, posterior, scores))

    def cls_targets(
        self,
        ctx: StepContext,
        embeddings: Tensor,
        posterior: Tensor | None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """DINO's ``[2, B, K]`` targets: the mixture's posterior, partial's balanced scores,
        or the centred and sharpened scores (``scores``: the teacher's, where the mixture's
        update computed them)."""
        assert self.objective is not None
        prototypes = ctx.prototypes
        k = prototypes.teacher.num_prototypes
        if posterior is not None and self.wants_posterior(prototypes.kind):
            return self.posterior_targets(prototypes.kind, posterior).view(NUM_GLOBAL_VIEWS, -1, k)
        if isinstance(prototypes.kind, Partial):
            # CAPI: Sinkhorn-Knopp over the whole (all-reduced) batch, no centring.
            with torch.no_grad():
                logits = prototypes.teacher(embeddings.float()) / prototypes.kind.target_temperature
                return sinkhorn_knopp(logits).view(NUM_GLOBAL_VIEWS, -1, k)
        # Centre and sharpen with the previous centre, then move it. Prototypes the mixture
        # just moved (split and merge) start from the mean centre, not a stale one.
        if prototypes.mixture is not None:
            self.objective.reset_center(prototypes.mixture.moved)
        with torch.no_grad():
            if scores is None:
                scores = prototypes.teacher(embeddings)
            scores = scores.view(NUM_GLOBAL_VIEWS, -1, k)
        targets = self.objective.teacher_distribution(scores, ctx.schedule["teacher_temperature"])
        self.objective.update_center(scores)
        return targets

    def student_loss(
        self, ctx: StepContext, views: list[Tensor], teacher: TeacherOutput, targets: Targets
    ) -> StepOutput:
        # The student embeds every view; DINO's cross-entropy over all (teacher view, other
        # student view) pairs against the prototypes (eq. 3).
        loss = self.cls_loss(ctx, embed(ctx.student, views), targets.probs)
        if ctx.prototypes.clustering is None:
            return StepOutput(loss, targets.probs)
        # Partial (CAPI): the teacher's layer learns to predict its own balanced targets from
        # the detached teacher embeddings, so no gradient of it reaches the encoder.
        clustering = self.clustering_loss(ctx, teacher.embeddings, targets.probs)
        return StepOutput(
            loss + clustering, targets.probs, {"train/clustering_loss": clustering.detach()}
        )

    def cls_loss(self, ctx: StepContext, embeddings: Tensor, targets: Tensor) -> Tensor:
        """DINO's loss of the student's ``[V_s * B, d]`` embeddings against ``[2, B, K]``
        targets. Decoupled prototypes are constants of this step (eq. 3), so the loss and its
        gradient to the embeddings come from one pass that keeps no ``[V_s * B, K]`` tensor
        for backward (:meth:`DINOLoss.against_fixed_prototypes`)."""
        assert self.objective is not None
        prototypes = ctx.prototypes.student
        if prototypes.decoupled:
            unit = prototypes.unit_inputs(embeddings)
            return self.objective.against_fixed_prototypes(unit, prototypes.prototypes(), targets)
        scores = prototypes(embeddings).view(-1, targets.shape[1], targets.shape[2])
        return self.objective(scores, teacher_probs=targets)

    @staticmethod
    def clustering_loss(ctx: StepContext, embeddings: Tensor, targets: Tensor) -> Tensor:
        """Partial: ``CE(targets, softmax(W h / T_c))`` over the teacher rows (CAPI's loss).

        ``h`` is detached, so the only gradient is the clustering layer's ``W``.
        """
        kind, layer = ctx.prototypes.kind, ctx.prototypes.clustering
        assert isinstance(kind, Partial) and layer is not None
        scores = layer(embeddings.detach().float())  # [2B, K]
        log_probs = torch.log_softmax(scores / kind.temperature, dim=1)
        return -(targets.reshape(scores.shape) * log_probs).sum(dim=1).mean()
