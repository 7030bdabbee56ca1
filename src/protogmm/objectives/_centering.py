"""What DINO's and iBOT's teachers share: the centred, sharpened softmax and the centre's EMA.

Caron et al. (2021), Eq. (3)-(4); Zhou et al. (2022) apply the same to the patch tokens with
their own centre ``C2``. Kept in one place so the [CLS] and patch paths cannot drift apart.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from protogmm._checks import check_in_range, check_positive_int


def compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32 (softmax of scores / 0.04 overflows or loses mass in half precision),
    but float64 stays float64 so that reference tests can be exact."""
    return torch.promote_types(x.dtype, torch.float32)


def centred_softmax(scores: Tensor, center: Tensor, temperature: float) -> Tensor:
    """``softmax((t - C) / tau)`` over the last axis, detached, in :func:`compute_dtype`."""
    dtype = compute_dtype(scores)
    # One [N, K] buffer, worked in place (the subtraction makes it; a softmax of the
    # expression would hold three: at K = 65,536 and 512 rows, 128 MiB each).
    logits = scores.detach().to(dtype) - center.to(dtype)
    logits.div_(temperature)
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


@torch.no_grad()
def update_center_(center: Tensor, rows: Tensor, momentum: float) -> None:
    """``C <- m C + (1 - m) mean(rows)``, in place, the mean taken over all ranks.

    Args:
        center: ``[1, K]`` buffer, updated in place (so the object that DDP, the EMA and the
            checkpoints refer to stays the same).
        rows: ``[N, K]`` the rows whose mean is this step's centre (DINO: every teacher
            score; iBOT: each image's mean patch score). Under ``torch.distributed`` with
            more than one process, the sum is all-reduced and divided by ``N * world_size``
            (equal batch sizes per rank, as DINO and iBOT assume).
        momentum: ``m`` in ``[0, 1]``.
    """
    rows = rows.detach()
    batch_center = rows.to(compute_dtype(rows)).sum(dim=0, keepdim=True)
    count = rows.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch_center)
        count *= dist.get_world_size()
    batch_center = batch_center / count
    center.copy_(center * momentum + batch_center.to(center.dtype) * (1.0 - momentum))


class CentredDistillation(nn.Module):
    """The state DINO's loss and iBOT's patch loss share: K, the student's temperature and
    the teacher's centre (a ``[1, K]`` buffer, zeros at init, updated by EMA with
    ``center_momentum``).

    Args:
        num_prototypes: K, the number of prototypes (score columns).
        student_temperature: ``tau_s`` (> 0); DINO and iBOT use 0.1.
        center_momentum: ``m`` in ``[0, 1]``; DINO and iBOT use 0.9.
    """

    center: Tensor

    def __init__(
        self, num_prototypes: int, student_temperature: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.num_prototypes = check_positive_int("num_prototypes", num_prototypes)
        self.student_temperature = check_in_range(
            "student_temperature", student_temperature, 0.0, math.inf, low_inclusive=False
        )
        self.center_momentum = check_in_range("center_momentum", center_momentum, 0.0, 1.0)
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, "
            f"student_temperature={self.student_temperature}, "
            f"center_momentum={self.center_momentum}"
        )
