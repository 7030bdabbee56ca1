"""Geometry of a prototype set: PCA-2 picture and angle density (paper Fig. 1).

Fig. 1 of "Why Prototypes Collapse" (Arteaga et al., ICLR 2026) projects the L2-normalised
prototypes onto their first two principal components ``(P1, P2)``, draws the 2-D density
with the unit circle, and the density of the angle ``atan2(P2, P1)`` on ``[-pi, pi]``:
flat (``1 / (2 pi)``) for a healthy set, a few peaks under partial collapse, one spike under
total collapse. Here:

* :func:`pca_2d` normalises the rows, finds the two principal directions and projects the
  *uncentred* normalised rows onto them, so that every point lies in the unit disc and the
  unit circle is a meaningful reference. A point near the circle is a prototype lying
  (almost) in the ``(P1, P2)`` plane. With ``d`` large a diverse set fills a disc of radius
  about ``sqrt(2 / d)`` (most of each unit row is orthogonal to the plane), whereas the
  paper's healthy sets form a ring: read the *angle*, which does not depend on the radius.
* :func:`prototype_angles` is ``atan2(P2, P1)`` of those projections.
* :func:`angle_density` and :func:`angle_flatness` turn the angles into numbers: the
  histogram density and its total-variation distance from the uniform density.

Principal directions (``center=True``, the default) are those of the *centred* normalised
rows: the directions along which the prototypes differ most, so clusters separate into
distinct angles. Blind spot: when the whole set is one tight cluster (total collapse) the
centred directions are those of the within-cluster noise, orthogonal to the cluster's mean,
and the angles of that noise look spread. ``center=False`` takes the directions of the
uncentred rows (second moment): one cluster then lies on ``P1`` and gives one spike, but a
diverse set whose mean is far from zero is pushed into the half-plane ``P1 > 0``. Unique
prototype counts (:func:`protogmm.diagnostics.unique_prototypes`) have neither problem.

Plots use matplotlib's object-oriented ``Figure`` API, not ``pyplot``: importing this module
neither selects a backend nor keeps figures alive, and plotting works headless.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from protogmm._checks import check_matrix, check_positive_int

__all__ = [
    "angle_density",
    "angle_flatness",
    "pca_2d",
    "plot_prototype_geometry",
    "plot_unique_vs_eps",
    "prototype_angles",
]

_UNIFORM_DENSITY = 1.0 / (2.0 * math.pi)
# Half-width of the square drawn around the unit circle, and its grid resolution.
_EXTENT = 1.15
_GRID = 161
# Gaussian smoothing of the 2-D histogram, in grid cells (a cheap KDE).
_SMOOTH_CELLS = 2.0


def pca_2d(prototypes: Tensor, *, center: bool = True) -> Tensor:
    """Project the L2-normalised prototypes onto their top-2 principal directions.

    The directions are the top-2 right singular vectors (``torch.linalg.svd``, float64) of
    the ``d x d`` scatter matrix of the normalised rows, centred first if ``center`` (see
    the module docstring for the trade-off). Each direction's sign is fixed so that its
    largest-magnitude entry is positive, which makes the result deterministic. The
    projected rows are the normalised rows *without* centring, so every point lies inside
    the unit disc.

    Args:
        prototypes: ``[K, d]`` finite floating-point tensor with ``d >= 2`` and no all-zero
            row, any device.
        center: take the principal directions of the centred rows (True, the paper's
            "PCA") or of the uncentred rows (False).

    Returns:
        ``[K, 2]`` float64 CPU tensor of ``(P1, P2)`` coordinates, each row of norm <= 1.

    Raises:
        ValueError: if ``prototypes`` is not a finite 2-D float tensor with ``d >= 2`` or
            has an all-zero row.
    """
    unit = _unit_rows(prototypes)
    rows = unit - unit.mean(dim=0, keepdim=True) if center else unit
    scatter = rows.T @ rows  # [d, d], symmetric PSD
    _, _, vh = torch.linalg.svd(scatter)
    directions = vh[:2]  # [2, d], the top-2 principal directions
    largest = directions.abs().argmax(dim=1)
    signs = torch.sign(directions[torch.arange(2), largest])
    directions = directions * torch.where(signs == 0, 1.0, signs)[:, None]
    return unit @ directions.T


def prototype_angles(prototypes: Tensor, *, center: bool = True) -> Tensor:
    """Angle ``atan2(P2, P1)`` of each prototype in the PCA-2 plane (paper Fig. 1).

    Args:
        prototypes: ``[K, d]`` prototypes (see :func:`pca_2d`).
        center: passed to :func:`pca_2d`.

    Returns:
        ``[K]`` float64 CPU tensor of angles in ``[-pi, pi]``.
    """
    projected = pca_2d(prototypes, center=center)
    return torch.atan2(projected[:, 1], projected[:, 0])


def angle_density(angles: Tensor, bins: int = 64) -> tuple[Tensor, Tensor]:
    """Histogram density of angles on ``[-pi, pi]``.

    Args:
        angles: ``[N]`` finite floating-point angles in ``[-pi, pi]`` (e.g. from
            :func:`prototype_angles`), ``N >= 1``.
        bins: number of equal-width bins (>= 1).

    Returns:
        ``(density, edges)``: ``[bins]`` float64 density, integrating to 1
        (``sum(density) * 2 pi / bins == 1``), and the ``[bins + 1]`` bin edges from
        ``-pi`` to ``pi``. The uniform density is ``1 / (2 pi)``.

    Raises:
        ValueError: on a non-1-D, empty, non-float or non-finite ``angles``, an angle
            outside ``[-pi, pi]``, or ``bins < 1``.
    """
    bins = check_positive_int("bins", bins)
    counts = _angle_counts(angles, bins)
    width = 2.0 * math.pi / bins
    edges = torch.linspace(-math.pi, math.pi, bins + 1, dtype=torch.float64)
    return counts / (counts.sum() * width), edges


def angle_flatness(angles: Tensor, bins: int = 32) -> float:
    """Total-variation distance between the angle histogram and the uniform density.

    ``TV = 1/2 * sum_b |n_b / N - 1 / bins|`` over ``bins`` equal bins of ``[-pi, pi]``:
    0 for a perfectly flat histogram, ``1 - 1 / bins`` when every angle falls in one bin
    (total collapse), about ``1 - m / bins`` for ``m`` equally used narrow peaks.

    Sampling noise alone gives ``TV ~ sqrt(bins / (2 pi N))`` for ``N`` angles drawn from
    the uniform density (Poisson counts), e.g. 0.07 for ``N = 1024, bins = 32`` and 0.01
    for ``N = 65536``: compare sets of similar size.

    Args:
        angles: ``[N]`` angles in ``[-pi, pi]`` (see :func:`angle_density`).
        bins: number of bins (>= 1).

    Returns:
        The distance, in ``[0, 1)``.
    """
    bins = check_positive_int("bins", bins)
    counts = _angle_counts(angles, bins)
    return float(0.5 * (counts / counts.sum() - 1.0 / bins).abs().sum())


def plot_prototype_geometry(
    prototype_sets: Mapping[str, Tensor],
    path: str | Path,
    *,
    bins: int = 64,
    center: bool = True,
) -> Path:
    """Draw paper Fig. 1 for several prototype sets, one column each.

    Top row: density of the PCA-2 projection (:func:`pca_2d`) as a Gaussian-smoothed 2-D
    histogram (square-root colour scale so that faint structure stays visible) with the
    unit circle. Bottom row: the angle density (:func:`angle_density`) with the uniform
    level ``1 / (2 pi)`` dashed, and the flatness (:func:`angle_flatness`) in the legend.

    Args:
        prototype_sets: ``{name: [K, d] prototypes}``, at least one set.
        path: where to write the PNG; parent folders are created. Written atomically.
        bins: angle-histogram bins.
        center: passed to :func:`pca_2d`.

    Returns:
        The path written.

    Raises:
        ValueError: on an empty mapping or a bad prototype matrix (named by its key).
    """
    sets = _check_sets(prototype_sets)
    bins = check_positive_int("bins", bins)
    # At least ~5 inches wide so the title fits above a single set.
    fig = Figure(figsize=(max(3.1 * len(sets), 5.2), 6.0))
    axes = fig.subplots(2, len(sets), squeeze=False, height_ratios=[1.25, 1.0])
    for column, (name, prototypes) in enumerate(sets.items()):
        try:
            projected = pca_2d(prototypes, center=center)
        except ValueError as error:
            raise ValueError(f"prototype_sets[{name!r}]: {error}") from None
        angles = torch.atan2(projected[:, 1], projected[:, 0])
        title = f"{name} (K={prototypes.shape[0]})"
        _draw_projection(axes[0][column], projected.numpy(), title)
        _draw_angle_density(axes[1][column], angles, bins)
    title = "Prototype geometry: PCA-2 of the normalised prototypes (paper Fig. 1)"
    fig.suptitle(title if len(sets) > 1 else title.replace(": ", ":\n", 1))
    fig.tight_layout()
    return save_figure_atomically(fig, path)


def plot_unique_vs_eps(
    curves: Mapping[str, Mapping[float, int]],
    num_prototypes: Mapping[str, int],
    path: str | Path,
    *,
    log_x: bool = False,
) -> Path:
    """Unique prototypes (% of K) against the threshold ε, one line per set (paper Fig. 3a).

    Args:
        curves: ``{name: {eps: unique count}}``, e.g. from
            :func:`protogmm.diagnostics.unique_prototype_curve`; at least one curve, each
            with at least one point.
        num_prototypes: ``{name: K}`` for every name in ``curves``.
        path: where to write the PNG; parent folders are created. Written atomically.
        log_x: use a logarithmic ε axis (the paper's is linear).

    Returns:
        The path written.

    Raises:
        ValueError: on an empty ``curves`` or curve, a missing or non-positive K, a
            non-positive ε, or a count outside ``[0, K]``.
    """
    if not curves:
        raise ValueError("curves must hold at least one curve, got an empty mapping")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    eps_ticks: set[float] = set()
    for name, curve in curves.items():
        points = _check_curve(name, curve, num_prototypes)
        k = num_prototypes[name]
        eps_values = [eps for eps, _ in points]
        percent = [100.0 * count / k for _, count in points]
        eps_ticks.update(eps_values)
        ax.plot(eps_values, percent, marker="o", linewidth=2.0, label=f"{name} (K={k})")
    ticks = sorted(eps_ticks)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0.0, right=1.04 * ticks[-1])
    ax.set_xticks(ticks)
    ax.set_xticklabels(_thinned_labels(ticks, log_x))
    ax.set_xlabel("cosine-distance threshold ε")
    ax.set_ylabel("unique prototypes (% of K)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("Unique prototypes against ε (Definition 2.1, paper Fig. 3a)")
    fig.tight_layout()
    return save_figure_atomically(fig, path)


# ---------------------------------------------------------------------- helpers


def _unit_rows(prototypes: Tensor) -> Tensor:
    """Validate ``prototypes`` and return its rows L2-normalised, as CPU float64."""
    check_matrix("prototypes", prototypes, min_rows=1, finite=True)
    if prototypes.shape[1] < 2:
        raise ValueError(
            f"prototypes must have at least 2 columns for a 2-D projection, got shape "
            f"{tuple(prototypes.shape)}"
        )
    rows = prototypes.detach().to(device="cpu", dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    zero = (norms == 0).flatten()
    if bool(zero.any()):
        row = int(zero.nonzero()[0, 0])
        raise ValueError(
            f"prototypes row {row} is all zeros (norm 0), so its direction is undefined"
        )
    return rows / norms


def _angle_counts(angles: Tensor, bins: int) -> Tensor:
    """Validate ``angles`` and count them in ``bins`` equal bins of ``[-pi, pi]`` (float64)."""
    if not isinstance(angles, Tensor):
        raise ValueError(f"angles must be a torch.Tensor, got {type(angles).__name__}")
    if angles.ndim != 1 or angles.numel() == 0:
        raise ValueError(f"angles must have shape [N] with N >= 1, got shape {tuple(angles.shape)}")
    if not angles.is_floating_point():
        raise ValueError(f"angles must be a floating-point tensor, got dtype {angles.dtype}")
    a = angles.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("angles has a non-finite value (NaN or Inf)")
    # float32 atan2 can exceed float64 pi by one ulp; allow that much.
    if bool((a.abs() > math.pi + 1e-6).any()):
        raise ValueError(f"angles must lie in [-pi, pi], got {float(a.abs().max()):.6g}")
    index = ((a.clamp(-math.pi, math.pi) + math.pi) / (2.0 * math.pi) * bins).long()
    return torch.bincount(index.clamp(max=bins - 1), minlength=bins).to(torch.float64)


def _check_sets(prototype_sets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(prototype_sets, Mapping) or not prototype_sets:
        raise ValueError("prototype_sets must be a non-empty mapping {name: [K, d] tensor}")
    return dict(prototype_sets)


def _check_curve(
    name: str, curve: Mapping[float, int], num_prototypes: Mapping[str, int]
) -> list[tuple[float, int]]:
    """Validate one curve of :func:`plot_unique_vs_eps`; return its points sorted by ε."""
    if name not in num_prototypes:
        raise ValueError(f"num_prototypes has no entry for curve {name!r}")
    k = check_positive_int(f"num_prototypes[{name!r}]", num_prototypes[name])
    if not curve:
        raise ValueError(f"curves[{name!r}] must hold at least one (eps, count) point, got none")
    points = sorted((float(eps), int(count)) for eps, count in curve.items())
    for eps, count in points:
        if not eps > 0:
            raise ValueError(f"curves[{name!r}] has eps {eps!r}; eps must be > 0")
        if not 0 <= count <= k:
            raise ValueError(f"curves[{name!r}] has count {count} at eps {eps:g}, outside [0, {k}]")
    return points


def _thinned_labels(ticks: list[float], log_x: bool) -> list[str]:
    """Tick labels for sorted ε values, blank where a label would overlap the previous one."""
    position = [math.log(t) for t in ticks] if log_x else list(ticks)
    span = (position[-1] - position[0]) or 1.0
    labels, last = [], -math.inf
    for tick, where in zip(ticks, position, strict=True):
        keep = (where - last) >= 0.07 * span
        labels.append(f"{tick:g}" if keep else "")
        last = where if keep else last
    return labels


def _draw_projection(ax: Axes, projected: np.ndarray, title: str) -> None:
    """Smoothed 2-D histogram of the projected points, with the unit circle."""
    edges = np.linspace(-_EXTENT, _EXTENT, _GRID + 1)
    hist, _, _ = np.histogram2d(projected[:, 0], projected[:, 1], bins=(edges, edges))
    density = _gaussian_smooth(hist, _SMOOTH_CELLS).T  # rows = P2 for imshow
    ax.imshow(
        density,
        origin="lower",
        extent=(-_EXTENT, _EXTENT, -_EXTENT, _EXTENT),
        cmap="viridis",
        norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(density.max()), 1e-12)),
        interpolation="bilinear",
    )
    theta = np.linspace(0.0, 2.0 * np.pi, 361)
    ax.plot(np.cos(theta), np.sin(theta), color="white", linewidth=0.8, alpha=0.8)
    ax.set_xlim(-_EXTENT, _EXTENT)
    ax.set_ylim(-_EXTENT, _EXTENT)
    ax.set_aspect("equal")
    ax.set_xticks([-1, 0, 1])
    ax.set_yticks([-1, 0, 1])
    ax.set_xlabel("P1")
    ax.set_ylabel("P2")
    ax.set_title(title, fontsize=10)


def _draw_angle_density(ax: Axes, angles: Tensor, bins: int) -> None:
    """Step plot of the angle density with the uniform level dashed."""
    density, edges = angle_density(angles, bins)
    flatness = angle_flatness(angles)
    ax.stairs(
        density.numpy(),
        edges.numpy(),
        color="tab:green",
        linewidth=1.5,
        label=f"TV to uniform = {flatness:.2f}",
    )
    ax.axhline(
        _UNIFORM_DENSITY, color="black", linestyle="--", linewidth=1.0, label="uniform 1/(2π)"
    )
    ax.set_xlim(-math.pi, math.pi)
    ax.set_ylim(0.0, max(0.4, 1.1 * float(density.max())))
    ax.set_xticks([-math.pi, -math.pi / 2, 0.0, math.pi / 2, math.pi])
    ax.set_xticklabels(["−π", "−π/2", "0", "π/2", "π"])
    ax.set_xlabel("angle atan2(P2, P1) (rad)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper right")


def _gaussian_smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding), sigma in cells."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    blurred = np.apply_along_axis(np.convolve, 0, image, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 1, blurred, kernel, mode="same")


def save_figure_atomically(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG to a temporary file next to ``path``, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the same folder (so os.replace is atomic), created by savefig itself so
    # that the file gets the usual permissions (mkstemp's would be 0600).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
