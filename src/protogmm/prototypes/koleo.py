"""KoLeo-proto: the prototype-spreading regulariser baseline (design.md §4).

Govindarajan et al., "On Partial Prototype Collapse in the DINO Family of Self-Supervised
Methods" (BMVC 2024) counter partial prototype collapse in jointly learned prototypes by
maximising the Kozachenko-Leonenko differential-entropy estimate of the prototypes on the
sphere, the same estimator that DINOv2 (Oquab et al., 2023, ``KoLeoLoss`` in
facebookresearch/dinov2) applies to the batch of embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm._checks import check_in_range, check_matrix, check_positive_int


def koleo_proto_loss(prototypes: Tensor, eps: float = 1e-8, *, chunk_size: int = 2048) -> Tensor:
    """Kozachenko-Leonenko loss on the L2-normalised prototypes.

    ``L = -(1/K) * sum_k log( min_{j != k} ||c_k - c_j|| + eps )``, with
    ``c_k = prototypes_k / ||prototypes_k||`` (Govindarajan et al., BMVC 2024, KoLeo-proto;
    DINOv2's ``KoLeoLoss`` form). Minimising ``L`` pushes every prototype away from its
    nearest neighbour, so no two prototypes can merge.

    The nearest neighbour of each prototype is found under ``no_grad`` in chunks of
    ``chunk_size`` rows (largest cosine = smallest distance on the sphere), so the
    ``[K, K]`` similarity matrix never exists at once and autograd stores nothing of it;
    the distances to the chosen neighbours are then recomputed with gradient. Memory is
    ``O(chunk_size * K)`` plus ``O(K * d)``. The argmin's gradient is zero almost
    everywhere, so this equals differentiating the full expression.

    Args:
        prototypes: ``[K, d]`` prototype vectors, K >= 2 (normalised here).
        eps: added inside the log so duplicate prototypes (distance 0) give a finite loss.
        chunk_size: rows of the similarity matrix computed at a time.

    Returns:
        Scalar loss (float32, or float64 for float64 input), differentiable in
        ``prototypes``.

    Raises:
        ValueError: if ``prototypes`` is not a finite floating-point ``[K, d]`` tensor with
            K >= 2, or ``eps``/``chunk_size`` is invalid.
    """
    check_matrix("prototypes", prototypes, min_rows=2)
    check_in_range("eps", eps, 0.0, float("inf"), high_inclusive=False)
    check_positive_int("chunk_size", chunk_size)

    # Distances between near-duplicates lose all precision in half precision: upcast.
    dtype = torch.promote_types(prototypes.dtype, torch.float32)
    c = F.normalize(prototypes.to(dtype), dim=1)
    num = c.shape[0]

    with torch.no_grad(), torch.autocast(device_type=c.device.type, enabled=False):
        neighbour = torch.empty(num, dtype=torch.long, device=c.device)
        for start in range(0, num, chunk_size):
            stop = min(start + chunk_size, num)
            sims = c[start:stop] @ c.T  # [rows, K]
            # Exclude j == k: entry (i, start + i) is the prototype itself.
            sims.diagonal(offset=start).fill_(-float("inf"))
            neighbour[start:stop] = sims.argmax(dim=1)

    diff = c - c[neighbour]
    # sqrt of the squared norm, clamped: the plain norm's gradient is NaN at exact
    # duplicates (0/0); the clamp gives a zero gradient there instead.
    dist = diff.pow(2).sum(dim=1).clamp_min(torch.finfo(dtype).tiny).sqrt()
    return -torch.log(dist + eps).mean()
