"""Draw the example geometry (paper Fig. 1) and unique-vs-ε (paper Fig. 3a) plots.

Two synthetic prototype sets with K = 1024, d = 128:

* "collapsed (joint-like)": 97 % of the prototypes in 8 clusters of unequal size and
  spread around random directions, the rest random, like a jointly learned set after
  partial collapse;
* "diverse (random)": K random directions, like a decoupled set.

Usage::

    scripts/dev python -m benchmarks.example_plots [--out docs]

writes ``example-geometry.png`` and ``example-unique-vs-eps.png`` and prints the numbers the
plots show (angle flatness and unique counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from protogmm.diagnostics.geometry import (
    angle_flatness,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
)
from protogmm.diagnostics.uniqueness import unique_prototype_curve

NUM_PROTOTYPES = 1024
DIM = 128
EPS_VALUES = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


def collapsed_set(generator: torch.Generator) -> Tensor:
    """Most prototypes in 8 clusters (sizes and spreads vary), a few scattered."""
    num_clusters = 8
    num_scattered = NUM_PROTOTYPES // 32
    weights = torch.tensor([2.0**-i for i in range(num_clusters)])
    sizes = (weights / weights.sum() * (NUM_PROTOTYPES - num_scattered)).long()
    sizes[0] += NUM_PROTOTYPES - num_scattered - int(sizes.sum())
    spreads = torch.logspace(-1.3, -0.2, num_clusters)  # 0.05 ... 0.63
    centres = torch.randn(num_clusters, DIM, generator=generator)
    centres = centres / centres.norm(dim=1, keepdim=True)
    parts = []
    for centre, size, spread in zip(centres, sizes.tolist(), spreads.tolist(), strict=True):
        noise = torch.randn(size, DIM, generator=generator) / DIM**0.5
        parts.append(centre + spread * noise)
    parts.append(torch.randn(num_scattered, DIM, generator=generator))
    rows = torch.cat(parts)
    return rows[torch.randperm(NUM_PROTOTYPES, generator=generator)]


def diverse_set(generator: torch.Generator) -> Tensor:
    """Random directions (isotropic Gaussian rows)."""
    return torch.randn(NUM_PROTOTYPES, DIM, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    sets = {
        "collapsed (joint-like)": collapsed_set(generator),
        "diverse (random)": diverse_set(generator),
    }
    curves = {name: unique_prototype_curve(p, EPS_VALUES) for name, p in sets.items()}
    for name, prototypes in sets.items():
        flatness = angle_flatness(prototype_angles(prototypes))
        counts = ", ".join(f"{eps:g}: {count}" for eps, count in curves[name].items())
        print(f"{name}: angle flatness (TV) {flatness:.3f}; unique at eps {counts}")

    geometry = plot_prototype_geometry(sets, args.out / "example-geometry.png")
    unique = plot_unique_vs_eps(
        curves,
        {name: p.shape[0] for name, p in sets.items()},
        args.out / "example-unique-vs-eps.png",
    )
    print(f"wrote {geometry} and {unique}")


if __name__ == "__main__":
    main()
