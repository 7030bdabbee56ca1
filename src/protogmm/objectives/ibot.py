"""iBOT's masked-patch self-distillation loss on prototype scores (design.md §4).

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), Eq. (2)-(3);
the reference is ``iBOTLoss`` in bytedance/ibot ``main_ibot.py``. iBOT = DINO on the [CLS]
token (:class:`~protogmm.objectives.DINOLoss`, the student's global views masked) plus this
loss: the student sees a global view ``u`` with block-masked patches (mask ``m``), the
teacher sees it unmasked, and at every masked position ``i`` the student's patch
distribution predicts the teacher's,

``L_MIM = -(1/V) sum_v (1/B) sum_b [ sum_i m_bi P_t(u_bi) . log P_s(u^_bi) ] / max(1, sum_i m_bi)``

with ``P_s = softmax(s / tau_s)`` and ``P_t = softmax((t - C2) / tau_t2)``: cross-entropy
averaged over the masked tokens of each image (an image without masked patches contributes
0), then over the images and the global views. ``C2`` is the patch centre, an EMA of the
teacher's patch scores averaged over positions, then over images (all-reduced). The scores
are cosines against any :class:`~protogmm.prototypes.base.PrototypeSet` (the [CLS]
prototypes or separate patch prototypes); ready targets (e.g. an ``OnlineGMM`` posterior)
are accepted instead of centred, sharpened ones.
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

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(CentredDistillation):
    """Cross-entropy of the student's masked patch tokens against the teacher's.

    Only the masked positions enter the loss, so the inputs are the masked rows alone, in the
    order of ``masks.nonzero()`` (view, image, patch: row-major), which is what
    ``scores[masks]`` gives for ``[V, B, P, K]`` scores and ``[V, B, P]`` masks.

    Args:
        num_prototypes: K, the number of (patch) prototypes.
        student_temperature: ``tau_s`` (> 0); iBOT 0.1.
        center_momentum: momentum of the patch centre ``C2``, in ``[0, 1]``; iBOT 0.9.

    Attributes:
        center: buffer ``[1, K]``, the EMA of the teacher's mean patch scores (zeros at init).
    """

    @torch.no_grad()
    def teacher_distribution(self, teacher_scores: Tensor, teacher_temperature: float) -> Tensor:
        """Centred, sharpened patch targets ``softmax((t - C2) / tau_t2)`` (no centre update).

        Args:
            teacher_scores: ``[N, K]`` teacher patch scores (any rows, e.g. the masked ones).
            teacher_temperature: ``tau_t2`` (> 0); iBOT warms it up from 0.04 to 0.07.

        Returns:
            ``[N, K]`` probabilities (float32, or float64 for float64 input), no grad.
        """
        # Zero rows is a step where no patch of this process's images was masked (iBOT
        # masks each image with a probability): no targets, the patch loss is 0.
        check_matrix(
            "teacher_scores", teacher_scores, cols=self.num_prototypes, min_rows=0, finite=False
        )
        tau = check_in_range(
            "teacher_temperature", teacher_temperature, 0.0, math.inf, low_inclusive=False
        )
        return centred_softmax(teacher_scores, self.center, tau)

    @torch.no_grad()
    def update_center(self, teacher_scores: Tensor) -> None:
        """``C2 <- m C2 + (1 - m) mean_images(mean_patches(t))`` (iBOT ``update_center``).

        Args:
            teacher_scores: ``[N, P, K]`` teacher scores of all ``P`` patches of ``N``
                images (all views stacked); the mean over images is all-reduced under
                ``torch.distributed`` (equal batch sizes per rank, as iBOT assumes).
        """
        if teacher_scores.ndim != 3 or teacher_scores.shape[-1] != self.num_prototypes:
            raise ValueError(
                f"teacher_scores must have shape [N, P, {self.num_prototypes}], got "
                f"{tuple(teacher_scores.shape)}"
            )
        per_image = teacher_scores.detach().to(compute_dtype(teacher_scores)).mean(dim=1)
        update_center_(self.center, per_image, self.center_momentum)

    def forward(self, student_scores: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """The masked-patch loss ``L_MIM`` (module docstring).

        Args:
            student_scores: ``[M, K]`` student scores of the masked patch tokens, ``M`` =
                ``masks.sum()``, rows in ``masks.nonzero()`` order.
            teacher_probs: ``[M, K]`` teacher targets at the same positions (rows summing
                to 1; detached here).
            masks: ``[V, B, P]`` (or ``[V, B, h, w]``) bool, True where the student's patch
                was masked.

        Returns:
            Scalar loss (float32, or float64 for float64 input); 0 (with a graph) when no
            patch is masked.

        Raises:
            ValueError: on inconsistent shapes (naming the argument).
        """
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.ndim not in (3, 4):
            raise ValueError("masks must be a bool tensor of shape [V, B, P] or [V, B, h, w]")
        masks = masks.flatten(2)
        num_views, batch = masks.shape[:2]
        num_masked = int(masks.sum())
        for name, x in (("student_scores", student_scores), ("teacher_probs", teacher_probs)):
            check_matrix(name, x, cols=self.num_prototypes, min_rows=0, finite=False)
        for name, x in (("student_scores", student_scores), ("teacher_probs", teacher_probs)):
            if x.shape[0] != num_masked:
                raise ValueError(
                    f"{name} must have one row per masked patch ({num_masked}), got shape "
                    f"{tuple(x.shape)}"
                )
        dtype = compute_dtype(student_scores)
        log_probs = F.log_softmax(student_scores.to(dtype) / self.student_temperature, dim=-1)
        cross_entropy = -(teacher_probs.detach().to(dtype) * log_probs).sum(dim=-1)  # [M]
        # Sum the masked tokens of each (view, image), then divide by their number.
        image_of_row = masks.reshape(num_views * batch, -1).nonzero()[:, 0]
        per_image = cross_entropy.new_zeros(num_views * batch).index_add(
            0, image_of_row, cross_entropy
        )
        per_image = per_image / masks.sum(dim=-1).reshape(-1).clamp_min(1).to(dtype)
        # Mean over images, then over views (iBOT: sum of per-view means / number of views).
        return per_image.view(num_views, batch).mean(dim=1).mean()
