"""Host losses on prototype scores (design.md §4): pure PyTorch, no Lightning."""

from __future__ import annotations

from protogmm.objectives.carp import CARPLoss, CARPTerms
from protogmm.objectives.dino import DINOLoss
from protogmm.objectives.ibot import IBOTPatchLoss

__all__ = ["CARPLoss", "CARPTerms", "DINOLoss", "IBOTPatchLoss"]
