"""Projection head: DINO's MLP up to the L2-normalised bottleneck (Caron et al., ICCV 2021).

DINO's ``DINOHead`` (facebookresearch/dino, ``vision_transformer.py``) is an MLP to a
bottleneck, an L2 normalisation, then a weight-normalised last layer whose rows are the
prototypes. Here the head stops at the normalised bottleneck: the last layer is a prototype
set (:mod:`protogmm.prototypes`, joint ``LearnedPrototypes`` or decoupled ``OnlineGMM``),
kept apart so that either kind can score the same embeddings.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from protogmm._checks import check_positive_int

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """MLP from backbone features to unit-norm bottleneck embeddings (DINO's head minus its
    last layer).

    Layout for ``num_layers = n``: ``n - 1`` blocks of Linear-(BatchNorm)-GELU (the first from
    ``in_dim`` to ``hidden_dim``, the others ``hidden_dim`` to ``hidden_dim``), then a Linear to
    ``bottleneck_dim``, then ``F.normalize`` along the feature dimension. ``num_layers = 1`` is
    a single Linear to the bottleneck. Linear weights start trunc-normal (std 0.02) with zero
    biases, as in DINO.

    The prototype layer is **not** part of this head: prototype sets live in
    :mod:`protogmm.prototypes`, and the trainer scores this head's output against them.

    Args:
        in_dim: backbone feature dimension.
        hidden_dim: width of the hidden layers (DINO: 2048; smaller suits small models).
        bottleneck_dim: output dimension ``d``, the prototypes' dimension (DINO: 256).
        num_layers: number of Linear layers (>= 1; DINO: 3).
        use_bn: BatchNorm after each hidden Linear (DINO: False for ViT, True for ResNet).

    Attributes:
        mlp: the ``nn.Sequential`` before the normalisation.
        in_dim, out_dim: input and output dimensions.
        use_bn: whether the MLP normalises its hidden layers (iBOT then projects every
            patch token, so the statistics are the unmasked ones).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        num_layers: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("bottleneck_dim", bottleneck_dim)
        check_positive_int("num_layers", num_layers)
        self.in_dim = in_dim
        self.out_dim = bottleneck_dim
        self.use_bn = use_bn
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map features ``[B, in_dim]`` to unit-norm embeddings ``[B, bottleneck_dim]``."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape [B, {self.in_dim}], got {tuple(x.shape)}")
        return F.normalize(self.mlp(x), dim=1)
