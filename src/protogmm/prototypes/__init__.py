"""Prototype sets: joint (learned by gradient) and decoupled (online Gaussian mixture)."""

from protogmm.prototypes.base import PrototypeSet
from protogmm.prototypes.gmm import OnlineGMM
from protogmm.prototypes.koleo import koleo_proto_loss
from protogmm.prototypes.learned import LearnedPrototypes
from protogmm.prototypes.mixture_options import MixtureOptions

__all__ = [
    "LearnedPrototypes",
    "MixtureOptions",
    "OnlineGMM",
    "PrototypeSet",
    "koleo_proto_loss",
]
