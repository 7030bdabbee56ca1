"""Jointly learned prototypes: DINO's weight-normalised last layer (design.md §2).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021),
score the L2-normalised bottleneck embedding against a ``weight_norm``-ed linear layer whose
gain ``g`` is fixed to 1 (``DINOHead(norm_last_layer=True)`` in facebookresearch/dino,
``vision_transformer.py``). Each output unit is then the cosine between the embedding and
one row direction ``v_k / ||v_k||``: those row directions are the prototypes. Gradients of
the host loss reach them together with the encoder, which is the "joint" training that the
ICLR 2026 paper (Arteaga et al.) shows collapses partially.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protogmm._checks import check_in_range, check_matrix, check_positive_int
from protogmm.prototypes.base import PrototypeSet


class LearnedPrototypes(PrototypeSet):
    """``K`` prototypes learned by gradient: a linear layer with unit-norm rows.

    Equivalent to DINO's ``nn.utils.weight_norm(nn.Linear(d, K, bias=False))`` with
    ``weight_g`` filled with 1 and frozen (``norm_last_layer=True``): the free parameter is
    the direction ``v`` and the effective weight is ``v / ||v||`` row-wise, so

    ``forward(z)[b, k] = <z_b / ||z_b||, v_k / ||v_k||>``  (a cosine in ``[-1, 1]``).

    The teacher holds an EMA copy of ``weight``, as in DINO. DINO's ``freeze_last_layer``
    (no update for the first epoch) is an optimizer-side choice and lives in the trainer.

    Args:
        num_prototypes: K, the number of prototypes (>= 1).
        dim: d, the embedding dimension (>= 1).
        init_scale: factor on the initial ``weight`` (> 0; 1: nn.Linear's init). The
            directions, and so the scores, are the same as at 1 for the same RNG state;
            only ``||v||`` changes, and with it the angle an optimizer step turns a
            prototype by (about ``lr * sqrt(d) / ||v||`` for AdamW). DINO's weight decay
            shrinks ``||v||`` of its last layer to about 0.05-0.25 in its first epochs,
            while nn.Linear's init gives about 0.5 here; 0.1 starts there.

    Attributes:
        weight: ``nn.Parameter`` ``[K, d]``, the un-normalised directions ``v``. Its scale is
            irrelevant to the scores; only its row directions matter.
    """

    decoupled = False

    def __init__(self, num_prototypes: int, dim: int, init_scale: float = 1.0) -> None:
        check_positive_int("num_prototypes", num_prototypes)
        check_positive_int("dim", dim)
        check_in_range("init_scale", init_scale, 0.0, math.inf, low_inclusive=False)
        super().__init__(num_prototypes, dim)
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        # DINO builds its last layer after ``self.apply(_init_weights)``, so the layer keeps
        # nn.Linear's default init (kaiming-uniform, a = sqrt(5)); we reproduce it exactly.
        # Draws from the global RNG, so ``torch.manual_seed`` makes it reproducible.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if init_scale != 1.0:  # after the draw: same directions, same RNG stream as at 1
            with torch.no_grad():
                self.weight.mul_(init_scale)

    def prototypes(self) -> Tensor:
        """Return the ``[K, d]`` unit-norm prototypes ``v_k / ||v_k||`` (differentiable)."""
        return F.normalize(self.weight, dim=1)

    def forward(self, z: Tensor) -> Tensor:
        """Cosine scores of embeddings against the prototypes.

        Args:
            z: ``[B, d]`` embeddings; normalised here, so any non-zero scale is accepted.

        Returns:
            ``[B, K]`` cosine scores, differentiable in both ``z`` and ``weight``. Under
            autocast the product may run in low precision; host losses upcast.

        Raises:
            ValueError: if ``z`` is not a floating-point ``[B, d]`` tensor with ``d == dim``.
        """
        # finite=False: a finiteness check would force a device sync on every forward of
        # the hot path; a NaN here still surfaces as a NaN loss.
        check_matrix("z", z, cols=self.dim, min_rows=0, finite=False)  # 0 rows: no scores
        return F.normalize(z, dim=1) @ self.prototypes().T

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, dim={self.dim}"
