"""Diagnostics of partial prototype collapse."""

from protogmm.diagnostics.uniqueness import (
    DEFAULT_EPS,
    representatives,
    unique_prototype_curve,
    unique_prototypes,
)

__all__ = ["DEFAULT_EPS", "representatives", "unique_prototype_curve", "unique_prototypes"]
