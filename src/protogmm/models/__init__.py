"""Encoders, projection head and EMA teacher (pure PyTorch; no Lightning import)."""

from protogmm.models.backbones import (
    BACKBONES,
    ConvNet,
    SmallViT,
    TimmBackbone,
    TorchvisionResNet,
    build_backbone,
)
from protogmm.models.ema import make_teacher, teacher_momentum, update_ema_
from protogmm.models.heads import ProjectionHead

__all__ = [
    "BACKBONES",
    "ConvNet",
    "ProjectionHead",
    "SmallViT",
    "TimmBackbone",
    "TorchvisionResNet",
    "build_backbone",
    "make_teacher",
    "teacher_momentum",
    "update_ema_",
]
