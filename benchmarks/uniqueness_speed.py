"""Time Definition 2.1's cover at scale: unique_prototypes / unique_prototype_curve, K x d.

    scripts/dev python -m benchmarks.uniqueness_speed [--k 65536] [--dim 256] [--repeats 2]

Prints one Markdown row per measurement (random unit vectors, where every prototype is
unique: the cover's worst case, since no row is ever absorbed).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from protogmm.diagnostics import DEFAULT_EPS, unique_prototype_curve, unique_prototypes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(args.k, args.dim, generator=generator)
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print("| call | K | d | seconds (best of repeats) | result |")
    print("|---|---|---|---|---|")
    for label, fn in (
        ("unique_prototypes(eps=0.025)", lambda: unique_prototypes(prototypes, 0.025)),
        (
            f"unique_prototype_curve({len(DEFAULT_EPS)} eps)",
            lambda: unique_prototype_curve(prototypes, DEFAULT_EPS),
        ),
    ):
        best, result = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        print(f"| {label} | {args.k} | {args.dim} | {best:.1f} | {result} |", flush=True)


if __name__ == "__main__":
    main()
