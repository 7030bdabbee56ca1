"""Tests of the prototype geometry diagnostics (paper Fig. 1) and the ε plot (Fig. 3a)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from protogmm.diagnostics.geometry import (
    angle_density,
    angle_flatness,
    pca_2d,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
)

DIM = 16


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q


def circle_set(angles: torch.Tensor, seed: int = 0, radius: float = 1.0) -> torch.Tensor:
    """Points ``(cos a, sin a)`` in the first two coordinates, rotated into ``DIM``-D."""
    flat = torch.zeros(len(angles), DIM, dtype=torch.float64)
    flat[:, 0], flat[:, 1] = radius * angles.cos(), radius * angles.sin()
    return flat @ random_rotation(DIM, seed).T


def even_angles(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) - math.pi


def test_uniform_circle_is_flat() -> None:
    prototypes = circle_set(even_angles(2000), radius=3.0)
    assert angle_flatness(prototype_angles(prototypes)) < 0.1
    # The circle lies in the principal plane: every projection is on the unit circle.
    radii = pca_2d(prototypes).norm(dim=1)
    torch.testing.assert_close(radii, torch.ones_like(radii))


def test_narrow_arc_is_collapsed() -> None:
    angles = 0.7 + 0.1 * torch.rand(2000, generator=torch.Generator().manual_seed(1))
    prototypes = circle_set(angles.double(), seed=2)
    assert angle_flatness(prototype_angles(prototypes)) > 0.8


def test_few_clusters_in_high_dimension_give_few_peaks() -> None:
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 64, generator=gen)
    labels = torch.arange(600) % 3
    prototypes = centres[labels] + 0.02 * torch.randn(600, 64, generator=gen)
    flatness = angle_flatness(prototype_angles(prototypes), bins=32)
    assert flatness > 0.8  # 3 narrow peaks of 32 bins: about 1 - 3 / 32


def test_random_set_is_flat_up_to_sampling_noise() -> None:
    prototypes = torch.randn(4096, 64, generator=torch.Generator().manual_seed(4))
    noise_floor = math.sqrt(32 / (2 * math.pi * 4096))
    assert angle_flatness(prototype_angles(prototypes), bins=32) < 2.5 * noise_floor


def test_uncentred_directions_see_a_single_cluster() -> None:
    # One tight cluster (total collapse): the centred directions only see its noise (the
    # documented blind spot); the uncentred ones put the cluster on P1.
    gen = torch.Generator().manual_seed(5)
    centre = torch.randn(64, generator=gen)
    prototypes = centre / centre.norm() + 0.01 * torch.randn(1000, 64, generator=gen)
    assert angle_flatness(prototype_angles(prototypes, center=False)) > 0.8


def test_pca_is_deterministic_and_inside_the_unit_disc() -> None:
    prototypes = torch.randn(300, 32, generator=torch.Generator().manual_seed(6))
    first, second = pca_2d(prototypes), pca_2d(prototypes.clone())
    assert torch.equal(first, second)
    assert first.shape == (300, 2) and first.dtype == torch.float64
    assert bool((first.norm(dim=1) <= 1 + 1e-12).all())
    # Scaling rows does not change the normalised prototypes.
    scale = 0.1 + 9 * torch.rand(300, 1, generator=torch.Generator().manual_seed(7))
    scaled = prototypes * scale
    torch.testing.assert_close(pca_2d(scaled), first)


def test_angles_are_in_range() -> None:
    angles = prototype_angles(torch.randn(500, 8, generator=torch.Generator().manual_seed(8)))
    assert angles.shape == (500,)
    assert bool((angles.abs() <= math.pi).all())


def test_angle_density_integrates_to_one() -> None:
    angles = (torch.rand(1000, generator=torch.Generator().manual_seed(9)) * 2 - 1) * math.pi
    angles[0], angles[1] = -math.pi, math.pi  # both ends land in a bin
    density, edges = angle_density(angles, bins=20)
    assert density.shape == (20,) and edges.shape == (21,)
    assert float(density.sum() * (2 * math.pi / 20)) == pytest.approx(1.0)
    assert float(edges[0]) == pytest.approx(-math.pi) and float(edges[-1]) == pytest.approx(math.pi)


def test_flatness_extremes() -> None:
    assert angle_flatness(torch.full((50,), 0.3), bins=10) == pytest.approx(0.9)
    assert angle_flatness(even_angles(40), bins=10) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.zeros(3, 1), r"prototypes must have at least 2 columns"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), r"prototypes row 1 is all zeros"),
        (torch.tensor([[1.0, float("nan")]]), r"prototypes has a non-finite value"),
        (torch.ones(4), r"prototypes must have shape \[N, D\]"),
    ],
)
def test_bad_prototypes_are_named(value: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pca_2d(value)


@pytest.mark.parametrize(
    ("value", "bins", "match"),
    [
        (torch.tensor([4.0]), 8, r"angles must lie in \[-pi, pi\]"),
        (torch.zeros(2, 2), 8, r"angles must have shape \[N\]"),
        (torch.tensor([1, 2]), 8, r"angles must be a floating-point"),
        (torch.tensor([float("nan")]), 8, r"angles has a non-finite"),
        (torch.zeros(3), 0, r"bins must be an integer >= 1"),
    ],
)
def test_bad_angles_are_named(value: torch.Tensor, bins: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        angle_density(value, bins=bins)


# -------------------------------------------------------------------------------- plots


def test_geometry_plot_is_written_atomically(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(10)
    sets = {
        "collapsed": torch.randn(4, 32, generator=gen).repeat(64, 1)
        + 0.01 * torch.randn(256, 32, generator=gen),
        "diverse": torch.randn(256, 32, generator=gen),
    }
    path = tmp_path / "plots" / "geometry.png"
    assert plot_prototype_geometry(sets, path) == path
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_prototype_geometry(sets, path)  # overwrites
    assert sorted(p.name for p in path.parent.iterdir()) == ["geometry.png"]


def test_geometry_plot_names_a_bad_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"prototype_sets\['bad'\]: prototypes row 0 is all zeros"):
        plot_prototype_geometry({"bad": torch.zeros(3, 4)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="prototype_sets must be a non-empty mapping"):
        plot_prototype_geometry({}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_unique_vs_eps_plot(tmp_path: Path) -> None:
    curves = {
        "joint": {0.025: 40, 0.05: 20, 0.1: 10, 0.25: 4, 0.5: 2},
        "decoupled": {0.025: 1024, 0.05: 1024, 0.1: 1024, 0.25: 1024, 0.5: 1000},
    }
    k = {"joint": 1024, "decoupled": 1024}
    path = plot_unique_vs_eps(curves, k, tmp_path / "unique.png")
    assert path.stat().st_size > 10_000
    log_path = plot_unique_vs_eps(curves, k, tmp_path / "unique-log.png", log_x=True)
    assert log_path.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unique-log.png", "unique.png"]


@pytest.mark.parametrize(
    ("curves", "k", "match"),
    [
        ({}, {}, "curves must hold at least one curve"),
        ({"a": {0.1: 3}}, {}, "num_prototypes has no entry for curve 'a'"),
        ({"a": {0.1: 3}}, {"a": 2}, r"curves\['a'\] has count 3 at eps 0.1, outside \[0, 2\]"),
        ({"a": {0.0: 1}}, {"a": 2}, r"curves\['a'\] has eps 0.0"),
        ({"a": {}}, {"a": 2}, r"curves\['a'\] must hold at least one"),
        ({"a": {0.1: 1}}, {"a": 0}, r"num_prototypes\['a'\] must be an integer >= 1"),
    ],
)
def test_unique_vs_eps_bad_inputs(tmp_path: Path, curves: dict, k: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_unique_vs_eps(curves, k, tmp_path / "u.png")
