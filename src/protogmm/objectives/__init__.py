"""Host losses on prototype scores (design.md §4): pure PyTorch, no Lightning."""

from __future__ import annotations

from protogmm.objectives.dino import DINOLoss

__all__ = ["DINOLoss"]
