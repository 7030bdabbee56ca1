"""DINO's cross-entropy against fixed prototypes, with no ``[N, K]`` tensor kept for backward.

Decoupled prototypes are constants of the student's step ("Why Prototypes Collapse", eq. 3:
the encoder is trained against the prototypes the mixture fitted in eq. 2), so the loss's
gradient reaches the student's embeddings alone. For the student row of view ``v`` and image
``b``, with scores ``s = z C^T``, ``p = softmax(s / tau_s)``, the teacher's targets ``q_t``
and ``Q = sum_{t != v} q_t[b]`` (the teacher views ``t`` paired with ``v``), DINO's loss
(Caron et al. 2021, eq. 1-3; :func:`~protogmm.objectives.dino._mean_cross_entropy`) is

``L = -(1 / (B P)) sum_{v, b} Q . log p``,  with ``P = V_t (V_s - 1)`` pairs,

and its gradient ``dL/ds = (sum(Q) p - Q) / (tau_s B P)``, ``dL/dz = dL/ds @ C``. Both are
computed in the forward pass, a block of rows at a time, so the step keeps the ``[N, d]``
gradient for backward instead of the ``[N, K]`` scores and log-probabilities autograd saves
(at K = 65,536 and ten views of 256 images, 640 MiB each in float32). The products are the
same two per row as autograd's (the scores, the gradient to the embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["fixed_prototype_cross_entropy"]

#: Elements of one block's ``[rows, K]`` scores (16 MiB in float32): three such blocks are
#: the loss's whole working memory, and a block is still 64 rows wide at K = 65,536.
_BLOCK_ELEMENTS = 1 << 22


def fixed_prototype_cross_entropy(
    embeddings: Tensor, prototypes: Tensor, targets: Tensor, student_temperature: float
) -> Tensor:
    """DINO's loss of unit student embeddings against fixed unit prototypes (module docstring).

    Equal to ``DINOLoss(K, tau_s)((embeddings @ prototypes.T).view(V_s, B, K),
    teacher_probs=targets)`` in value and in its gradient to ``embeddings``; no gradient
    reaches ``prototypes`` or ``targets``.

    Args:
        embeddings: ``[V_s * B, d]`` unit student embeddings, view-major (the first ``V_t``
            views are the teacher's, in its order), in their compute dtype.
        prototypes: ``[K, d]`` unit prototypes (constants of the step).
        targets: ``[V_t, B, K]`` teacher distributions.
        student_temperature: ``tau_s`` (> 0).

    Returns:
        The scalar loss, in ``embeddings``' dtype.
    """
    return _FixedPrototypeCrossEntropy.apply(
        embeddings, prototypes.detach(), targets.detach(), student_temperature
    )


class _FixedPrototypeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        embeddings: Tensor,
        prototypes: Tensor,
        targets: Tensor,
        temperature: float,
    ) -> Tensor:
        num_teacher, batch, k = targets.shape
        num_student = embeddings.shape[0] // batch
        scale = 1.0 / (batch * num_teacher * (num_student - 1))
        prototypes = prototypes.to(embeddings.dtype)
        targets = targets.to(embeddings.dtype)
        block = max(1, _BLOCK_ELEMENTS // k)
        total = embeddings.new_zeros(())
        gradient = torch.empty_like(embeddings)
        for view in range(num_student):
            paired_views = [t for t in range(num_teacher) if t != view]
            if not paired_views:  # one teacher view: its own student view pairs with none
                gradient[view * batch : (view + 1) * batch] = 0.0
                continue
            for start in range(0, batch, block):
                images = slice(start, min(start + block, batch))
                rows = slice(view * batch + images.start, view * batch + images.stop)
                # Q: the targets of every teacher view paired with this one (not its own).
                summed_targets = targets[paired_views[0], images].clone()
                for t in paired_views[1:]:
                    summed_targets += targets[t, images]
                scores = embeddings[rows] @ prototypes.T
                log_probs = F.log_softmax(scores.div_(temperature), dim=-1)
                del scores
                total = total - torch.dot(summed_targets.flatten(), log_probs.flatten())
                # dL/ds up to the scale: sum(Q) p - Q, in place of the log-probabilities.
                grad_scores = log_probs.exp_().mul_(summed_targets.sum(dim=-1, keepdim=True))
                gradient[rows] = grad_scores.sub_(summed_targets) @ prototypes
        ctx.save_for_backward(gradient.mul_(scale / temperature))
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return gradient * grad_output, None, None, None
