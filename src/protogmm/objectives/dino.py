"""The DINO self-distillation loss on prototype scores (design.md §4).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021),
Eq. (1)-(3) and Algorithm 1; the reference is ``DINOLoss`` in facebookresearch/dino
``main_dino.py``, which this module reproduces term for term. It works on the cosine
scores of any :class:`~protogmm.prototypes.base.PrototypeSet`, and also accepts ready-made
teacher targets, e.g. the posterior of a decoupled ``OnlineGMM`` (design.md §3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_in_range, check_matrix
from protogmm.objectives._centering import (
    CentredDistillation,
    centred_softmax,
    compute_dtype,
    update_center_,
)
from protogmm.objectives.fixed_prototypes import fixed_prototype_cross_entropy


def _check_views(name: str, x: object, num_prototypes: int) -> Tensor:
    """Check that ``x`` is a floating-point ``[V, B, K]`` tensor with ``K == num_prototypes``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [views, batch, K], got shape {tuple(x.shape)}")
    if x.shape[2] != num_prototypes:
        raise ValueError(
            f"{name} must have K={num_prototypes} in its last dim, got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one view and one sample, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_temperature(name: str, value: float) -> float:
    return check_in_range(name, value, 0.0, math.inf, low_inclusive=False, high_inclusive=False)


def _check_inputs(
    student_scores: Tensor,
    teacher_scores: Tensor | None,
    teacher_temperature: float | None,
    teacher_probs: Tensor | None,
    num_prototypes: int,
) -> None:
    """Check :meth:`DINOLoss.forward`'s inputs; a one-line ValueError names the argument.

    ``student_scores`` must be ``[V_s, B, K]`` with ``V_s >= 2``; exactly one of
    ``teacher_scores`` (with ``teacher_temperature``) or ``teacher_probs`` (without) is
    given, ``[V_t, B, K]`` with ``V_t <= V_s``.
    """
    _check_views("student_scores", student_scores, num_prototypes)
    num_student, batch = student_scores.shape[:2]
    if num_student < 2:
        raise ValueError(
            "student_scores must hold at least 2 views (one teacher/student pair), "
            f"got shape {tuple(student_scores.shape)}"
        )
    if (teacher_scores is None) == (teacher_probs is None):
        raise ValueError(
            "give exactly one of teacher_scores or teacher_probs, got "
            f"teacher_scores={'None' if teacher_scores is None else 'a tensor'} and "
            f"teacher_probs={'None' if teacher_probs is None else 'a tensor'}"
        )

    if teacher_scores is not None:
        name, teacher = "teacher_scores", teacher_scores
        if teacher_temperature is None:
            raise ValueError("teacher_temperature is required with teacher_scores, got None")
    else:
        name, teacher = "teacher_probs", teacher_probs
        if teacher_temperature is not None:
            raise ValueError(
                "teacher_temperature must be None with teacher_probs (targets are used "
                f"as-is), got {teacher_temperature!r}"
            )
    _check_views(name, teacher, num_prototypes)
    if teacher.shape[1] != batch:
        raise ValueError(
            f"{name} must have the batch size of student_scores {tuple(student_scores.shape)}"
            f", got shape {tuple(teacher.shape)}"
        )
    if teacher.shape[0] > num_student:
        raise ValueError(
            f"{name} must have at most as many views as student_scores "
            f"{tuple(student_scores.shape)}, got shape {tuple(teacher.shape)}"
        )


def _mean_cross_entropy(targets: Tensor, log_probs: Tensor) -> Tensor:
    """Mean over (teacher view ``t``, student crop ``v != t``) of the batch-mean ``H``.

    Args:
        targets: ``[V_t, B, K]`` teacher distributions.
        log_probs: ``[V_s, B, K]`` student log-probabilities (``V_s >= 2``, ``V_t <= V_s``).

    Returns:
        The scalar ``sum_t sum_{v != t} H(targets[t], log_probs[v]) / (V_t * (V_s - 1))``,
        summed in DINO's order (teacher view by teacher view).
    """
    num_teacher, num_student = targets.shape[0], log_probs.shape[0]
    # In the targets' dtype (the compute dtype) on the student's device, as the loss is.
    total = log_probs.new_zeros((), dtype=targets.dtype)
    for t in range(num_teacher):
        # [V_s]: batch-mean cross-entropy of teacher view t against every student crop.
        ce = -(targets[t] * log_probs).sum(dim=-1).mean(dim=-1)
        # Drop the same-view term by a 0/1 weight, not boolean indexing (which would
        # force a device sync to size its result).
        others = torch.ones_like(ce)
        others[t] = 0.0
        total = total + (ce * others).sum()
    return total / (num_teacher * (num_student - 1))


class DINOLoss(CentredDistillation):
    """Cross-entropy between centred, sharpened teacher and student prototype distributions.

    With student scores ``s`` and teacher scores ``t`` (cosines against the prototypes),
    Caron et al. (2021), Eq. (1)-(3):

    * student: ``P_s = softmax(s / tau_s)``;
    * teacher: ``P_t = softmax((t - C) / tau_t)``, with ``C`` an EMA of the teacher's mean
      score (centering, Eq. (4): ``C <- m C + (1 - m) mean_b t_b``);
    * loss: ``sum over global teacher views v and crops v' != v`` of
      ``H(P_t^v, P_s^{v'}) = -sum_k P_t^v[k] log P_s^{v'}[k]``, averaged over the batch.

    Exactly as facebookresearch/dino ``main_dino.py`` ``DINOLoss.forward``, the pair terms
    are *averaged* (summed, then divided by the number of pairs
    ``V_t * V_s - V_t``), and the center is updated after the targets are built, so
    the current step's targets use the previous center.

    Inputs are view-stacked: ``student_scores`` ``[V_s, B, K]`` holds all crops, the first
    ``V_t`` being the global views in the teacher's order; ``teacher_scores`` ``[V_t, B, K]``
    holds the global views only. The student's log-softmax runs in float32 (or float64)
    also under autocast; teacher targets never carry gradient.

    Args:
        num_prototypes: K, the number of prototypes (score columns).
        student_temperature: ``tau_s`` (> 0); DINO uses 0.1.
        center_momentum: ``m`` in ``[0, 1]``; DINO uses 0.9.

    Attributes:
        center: buffer ``[1, K]``, the EMA of teacher scores (zeros at init).
    """

    @torch.no_grad()
    def teacher_distribution(self, teacher_scores: Tensor, teacher_temperature: float) -> Tensor:
        """Centred, sharpened teacher targets ``softmax((t - C) / tau_t)`` (Eq. (3)-(4)).

        Uses the current center and does not update it.

        Args:
            teacher_scores: ``[V_t, B, K]`` teacher cosine scores.
            teacher_temperature: ``tau_t`` (> 0); DINO warms it up from 0.04 to 0.07.

        Returns:
            ``[V_t, B, K]`` probabilities in float32 (float64 for float64 input), no grad.
        """
        _check_views("teacher_scores", teacher_scores, self.num_prototypes)
        tau = _check_temperature("teacher_temperature", teacher_temperature)
        return centred_softmax(teacher_scores, self.center, tau)

    @torch.no_grad()
    def update_center(self, teacher_scores: Tensor) -> None:
        """EMA update of the center with the mean teacher score (DINO ``update_center``).

        ``C <- m C + (1 - m) * (sum of all V_t * B teacher rows) / (V_t * B * world_size)``,
        the sum being all-reduced over ranks when ``torch.distributed`` runs with more than
        one process (assumes equal batch sizes per rank, as DINO does).

        Args:
            teacher_scores: ``[V_t, B, K]`` teacher cosine scores.
        """
        _check_views("teacher_scores", teacher_scores, self.num_prototypes)
        rows = teacher_scores.reshape(-1, self.num_prototypes)
        update_center_(self.center, rows, self.center_momentum)

    def against_fixed_prototypes(
        self, embeddings: Tensor, prototypes: Tensor, teacher_probs: Tensor
    ) -> Tensor:
        """The loss of :meth:`forward` with ready targets, for prototypes that get no gradient.

        Equal to ``self((embeddings @ prototypes.T).view(V_s, B, K),
        teacher_probs=teacher_probs)`` in value and in its gradient to ``embeddings``, without
        keeping ``[V_s * B, K]`` tensors for backward
        (:func:`~protogmm.objectives.fixed_prototypes.fixed_prototype_cross_entropy`).

        Args:
            embeddings: ``[V_s * B, d]`` unit student embeddings, view-major.
            prototypes: ``[K, d]`` unit prototypes, constants of the step.
            teacher_probs: ``[V_t, B, K]`` target distributions.

        Returns:
            Scalar loss (float32, or float64 for float64 input).
        """
        _check_views("teacher_probs", teacher_probs, self.num_prototypes)
        check_matrix("prototypes", prototypes, finite=False)
        if prototypes.shape[0] != self.num_prototypes:
            raise ValueError(
                f"prototypes must have {self.num_prototypes} rows, got shape "
                f"{tuple(prototypes.shape)}"
            )
        batch = teacher_probs.shape[1]
        check_matrix("embeddings", embeddings, cols=prototypes.shape[1], finite=False)
        if embeddings.shape[0] % batch or embeddings.shape[0] // batch < max(
            2, teacher_probs.shape[0]
        ):
            raise ValueError(
                f"embeddings must hold V_s >= max(2, V_t) views of {batch} rows, got shape "
                f"{tuple(embeddings.shape)} for teacher_probs {tuple(teacher_probs.shape)}"
            )
        dtype = compute_dtype(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return fixed_prototype_cross_entropy(
                embeddings.to(dtype), prototypes, teacher_probs, self.student_temperature
            )

    @torch.no_grad()
    def reset_center(self, prototypes: Tensor) -> None:
        """Forget the centre of prototypes that just moved (decoupled split and merge).

        A moved prototype's running mean score is that of where it was; until the EMA
        catches up (about ``1 / (1 - m)`` steps) its targets would be centred by a stale
        value. Its entry is set to the mean centre of the prototypes that did not move, the
        same on every rank since the centre is.

        Args:
            prototypes: ``[K]`` bool mask of the moved prototypes.
        """
        if not bool(prototypes.any()) or bool(prototypes.all()):
            return
        self.center[:, prototypes] = self.center[:, ~prototypes].mean()

    def forward(
        self,
        student_scores: Tensor,
        teacher_scores: Tensor | None = None,
        *,
        teacher_temperature: float | None = None,
        teacher_probs: Tensor | None = None,
        update_center: bool = True,
    ) -> Tensor:
        """DINO loss over all (global teacher view, other student crop) pairs.

        Give either ``teacher_scores`` with ``teacher_temperature`` (the host's own teacher
        path: centering + sharpening, then the center update), or ``teacher_probs`` (ready
        targets, e.g. GMM posteriors: used as-is, no centering or sharpening, center
        untouched).

        Args:
            student_scores: ``[V_s, B, K]`` student cosine scores, V_s >= 2.
            teacher_scores: ``[V_t, B, K]`` teacher cosine scores, V_t <= V_s.
            teacher_temperature: ``tau_t`` (> 0), required with ``teacher_scores``.
            teacher_probs: ``[V_t, B, K]`` target distributions (rows summing to 1).
            update_center: update the center from ``teacher_scores`` after building the
                targets (whatever ``self.training`` is). Ignored with ``teacher_probs``.

        Returns:
            Scalar loss (float32, or float64 for float64 input).

        Raises:
            ValueError: on a bad shape, a missing or doubled target input, or a
                non-positive temperature; the message names the argument.
        """
        _check_inputs(
            student_scores, teacher_scores, teacher_temperature, teacher_probs, self.num_prototypes
        )

        dtype = compute_dtype(student_scores)
        if teacher_scores is not None:
            targets = self.teacher_distribution(teacher_scores, teacher_temperature)
        else:
            targets = teacher_probs.detach()
        targets = targets.to(dtype)

        # Explicit upcast instead of relying on autocast's float32 softmax list, so a bf16
        # student under autocast gets the same log-probabilities as in full precision.
        log_probs = F.log_softmax(student_scores.to(dtype) / self.student_temperature, dim=-1)

        loss = _mean_cross_entropy(targets, log_probs)

        if teacher_scores is not None and update_center:
            self.update_center(teacher_scores)
        return loss
