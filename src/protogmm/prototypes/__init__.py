"""Prototype sets: joint (learned by gradient) and decoupled (online Gaussian mixture), and
the kinds that choose between them (``--model.prototypes Joint|Decoupled|Partial``)."""

from protogmm.prototypes.base import PrototypeSet
from protogmm.prototypes.gmm import OnlineGMM
from protogmm.prototypes.kinds import Decoupled, Joint, Partial, PrototypeKind
from protogmm.prototypes.koleo import koleo_proto_loss
from protogmm.prototypes.learned import LearnedPrototypes
from protogmm.prototypes.mixture_options import MixtureOptions

__all__ = [
    "Decoupled",
    "Joint",
    "LearnedPrototypes",
    "MixtureOptions",
    "OnlineGMM",
    "Partial",
    "PrototypeKind",
    "PrototypeSet",
    "koleo_proto_loss",
]
