"""The prototype-set interface shared by joint and decoupled prototypes (design.md §2)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PrototypeSet(nn.Module, ABC):
    """A set of ``K`` unit vectors in ``R^d`` that a host objective scores embeddings against.

    Every prototype set exposes the same members, so hosts (DINO, iBOT, CARP) and
    diagnostics never need to know which kind they hold:

    * ``num_prototypes`` (K) and ``dim`` (d);
    * :meth:`prototypes` -> ``[K, d]`` unit-norm vectors (what the diagnostics measure);
    * :meth:`forward` -> ``[B, K]`` cosine scores of embeddings, differentiable in them;
    * :meth:`update` -> the decoupled estimation step from teacher embeddings
      (a no-op for prototypes learned jointly by gradient).

    Args:
        num_prototypes: K, the number of prototypes.
        dim: d, the embedding dimension.
    """

    #: True when the set is estimated outside the encoder's loss (no gradient reaches it).
    decoupled: bool = False

    def __init__(self, num_prototypes: int, dim: int) -> None:
        super().__init__()
        self.num_prototypes = num_prototypes
        self.dim = dim

    @abstractmethod
    def prototypes(self) -> Tensor:
        """Return the ``[K, d]`` unit-norm prototype vectors."""

    @abstractmethod
    def forward(self, z: Tensor) -> Tensor:
        """Return ``[B, K]`` cosine scores of the (L2-normalised) embeddings ``z`` ``[B, d]``."""

    def unit_inputs(self, z: Tensor) -> Tensor:
        """The unit vectors a decoupled set's :meth:`forward` scores ``z`` as, differentiable
        in ``z``: ``z`` normalised in float32 (a set may map it first: a centred mixture)."""
        return F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def update(self, h: Tensor) -> Tensor | None:
        """Decoupled estimation step from teacher embeddings ``h``; no-op by default."""
        return None
