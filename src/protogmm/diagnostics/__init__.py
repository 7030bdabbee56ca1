"""Diagnostics of partial prototype collapse (paper §2 and Fig. 1, 3, 4)."""

from protogmm.diagnostics.external import describe_prototypes, load_prototypes
from protogmm.diagnostics.geometry import (
    angle_density,
    angle_flatness,
    pca_2d,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
)
from protogmm.diagnostics.uniqueness import (
    DEFAULT_EPS,
    data_reference_curve,
    representatives,
    unique_prototype_curve,
    unique_prototypes,
)
from protogmm.diagnostics.usage import UsageAccumulator, prototype_usage

__all__ = [
    "DEFAULT_EPS",
    "UsageAccumulator",
    "angle_density",
    "angle_flatness",
    "data_reference_curve",
    "describe_prototypes",
    "load_prototypes",
    "pca_2d",
    "plot_prototype_geometry",
    "plot_unique_vs_eps",
    "prototype_angles",
    "prototype_usage",
    "representatives",
    "unique_prototype_curve",
    "unique_prototypes",
]
