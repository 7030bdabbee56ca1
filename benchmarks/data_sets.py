"""Decoupled prototypes across data sets: the mixture of today vs before issue 16, and joint.

    scripts/dev python -m benchmarks.derived_datasets --out runs/data     # once
    scripts/dev python -m benchmarks.data_sets --data-root runs/data      # the section
    scripts/dev python -m benchmarks.data_sets --quick                    # smoke (~1 min)

The demo's budget (DINO, ConvNet, 5 epochs at batch 128, K = 1024, 2 local crops) on the
embedded MNIST-5k, on two data sets derived from it (``derived_datasets.py``: inverted and
rotated, read as class folders), and on the synthetic blob images. Per data set and seed:
joint prototypes, decoupled with today's ``OnlineGMM`` defaults, and decoupled with the
first round's plain annealed online EM. Reports k-NN beside the
untrained encoder and raw pixels, unique prototypes (Definition 2.1) at the end and their
minimum over training, at eps = 0.025 and 0.1, and seconds per epoch.

Truncated EM against dense (issue 20, item 1: may ``top_k = 8`` become the default?):

    OMP_NUM_THREADS=1 scripts/dev python -m benchmarks.data_sets --data-root runs/data \
        --data MNIST-5k "MNIST-5k inverted" --seeds 0 1 2 --kinds decoupled-dense decoupled-topk8 \
        --out runs/benchmarks/data_sets_topk --reuse --section topk-default-runs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from protogmm.prototypes.gmm import PLAIN_ANNEALED_EM

from ._common import (
    column,
    command_line,
    machine_line,
    mean_std,
    replace_section,
    reuse_or_train,
)

KINDS: dict[str, dict[str, Any]] = {
    "joint": {"prototypes": "joint"},
    "decoupled": {"prototypes": "decoupled"},
    "decoupled, plain annealed EM (before issue 16)": {
        "prototypes": "decoupled",
        "gmm": PLAIN_ANNEALED_EM,
    },
    # Truncated EM against dense (issue 20, item 1), whatever the mixture's default:
    # ``--kinds decoupled-dense decoupled-topk8`` (not run by default). topk8: each teacher
    # row's E-step and statistics cover only its top 8 components by cosine.
    "decoupled-dense": {"prototypes": "decoupled", "gmm": {"top_k": None}},
    "decoupled-topk8": {"prototypes": "decoupled", "gmm": {"top_k": 8}},
    # Split and merge off (issue 16's default on): on MNIST-5k it is what merges the means
    # (BENCHMARKS "Decoupling at small scale"); this kind checks that on other data.
    "decoupled-no-split-merge": {
        "prototypes": "decoupled",
        "gmm": {"merge_overlap": None, "reseed_min_share": None},
    },
}
#: What the section says of a kind it reports.
NOTES = {
    "decoupled, plain annealed EM (before issue 16)": (
        '"Plain annealed EM": the first round\'s mixture (annealing of the whole posterior, '
        "initial\nvariance of all embeddings, no split and merge, one k-means run of 5 "
        "iterations on the first\nbatch, floor 1e-4, per-step mixing discount 0.98); the "
        "idle-step re-seeding that was the\ndefault just before issue 16 no longer exists "
        '(its demo numbers: "protogmm demo"\nsection). '
    ),
    "decoupled-dense": (
        "decoupled-dense: today's mixture with `top_k = None` (the dense update, every "
        "component).\n"
    ),
    "decoupled-topk8": (
        "decoupled-topk8: today's mixture with `top_k = 8` (truncated EM: each teacher row's "
        "E-step\nand statistics cover only its 8 components of highest cosine). "
    ),
    "decoupled-no-split-merge": (
        "decoupled-no-split-merge: today's mixture without split and merge "
        "(`merge_overlap = None`,\n`reseed_min_share = None`). "
    ),
}
#: The kinds run when ``--kinds`` is not given.
DEFAULT_KINDS = ["joint", "decoupled", "decoupled, plain annealed EM (before issue 16)"]
#: kind -> the run folder's suffix (``<data set>-<suffix>-seed<n>``).
RUN_SLUGS = {
    "joint": "joint",
    "decoupled": "decoupled",
    "decoupled, plain annealed EM (before issue 16)": "decoupled-before16",
    "decoupled-dense": "decoupled-dense",
    "decoupled-topk8": "decoupled-topk8",
    "decoupled-no-split-merge": "decoupled-no-split-merge",
}


def data_sets(root: Path) -> dict[str, dict[str, Any]]:
    """name -> SSLDataModule keywords."""
    folder = {"dataset": "folder", "image_size": 28, "in_channels": 1}
    return {
        "MNIST-5k": {"dataset": "mnist5k"},
        "MNIST-5k inverted": {**folder, "root": str(root / "mnist5k-inverted")},
        "MNIST-5k rotated": {**folder, "root": str(root / "mnist5k-rotated")},
        "synthetic (4,000 images, 32 px)": {
            "dataset": "synthetic",
            "synthetic": {"samples": 4000, "image_size": 32},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=Path("runs/data"))
    parser.add_argument("--data", nargs="*", default=None, help="data set names (default: all)")
    parser.add_argument("--kinds", nargs="*", default=DEFAULT_KINDS, choices=list(KINDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/data_sets"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 256 images")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--section", default="data-sets", help="the BENCHMARKS.md block to own (another seeds set)"
    )
    parser.add_argument("--heading", default=None, help="the section's heading line (markdown)")
    args = parser.parse_args()
    sets = data_sets(args.data_root)
    names = args.data or list(sets)
    common: dict[str, Any] = {"batch_size": 128, "num_local_crops": 2}
    num_prototypes = 1024
    if args.quick:
        args.epochs, names, args.seeds = 1, ["synthetic (4,000 images, 32 px)"], [0]
        common["synthetic"] = {"samples": 256, "image_size": 16}
        num_prototypes = 64
    lines = [
        "| data set | prototypes | k-NN (%) | unique % ε=0.025 end (min) | "
        "unique % ε=0.1 end (min) | s/epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
        for seed in args.seeds:
            for kind in args.kinds:
                slug = f"{name.split(' (')[0].replace(' ', '_')}-{RUN_SLUGS[kind]}"
                runs[kind].append(
                    reuse_or_train(
                        args.out / f"{slug}-seed{seed}",
                        name=f"{name}, {kind}, seed {seed}",
                        reuse=args.reuse,
                        epochs=args.epochs,
                        seed=seed,
                        model={"num_prototypes": num_prototypes, **KINDS[kind]},
                        data={**sets[name], **common},
                    )
                )
        for kind, results in runs.items():
            cells = [mean_std([r["knn/top1"] for r in results], 100)]
            for eps in ("0.025", "0.1"):
                curves = [column(r, f"unique_pct/eps={eps}") for r in results]
                if not all(curves):  # a mixture still collecting its initial embeddings
                    cells.append("not fitted")
                    continue
                end, low = [c[-1] for c in curves], [min(c) for c in curves]
                cells.append(f"{mean_std(end)} ({mean_std(low)})")
            cells.append(mean_std([r["seconds_per_epoch"] for r in results], digits=0))
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
        first = next(iter(runs.values()))
        for label, key in (("untrained encoder", "knn/untrained"), ("raw pixels", "knn/pixels")):
            value = mean_std([r[key] for r in first], 100)
            lines.append(f"| {name} | {label} | {value} | | | |")
    table = "\n".join(lines)
    print(table)
    if args.no_write or args.quick:
        return
    title = "" if args.section == "data-sets" else f" ({', '.join(names)}, seeds {args.seeds})"
    heading = args.heading or f"## Decoupled prototypes across data sets (issue 16){title}"
    kinds_notes = "".join(NOTES[kind] for kind in args.kinds if kind in NOTES)
    body = f"""{heading}

`{command_line()}`; {machine_line()}. Seeds {args.seeds}, mean ± std where several. The
demo's budget: DINO, ConvNet, {args.epochs} epochs at batch 128, K = 1024, 2 local crops.
{kinds_notes}Unique % at the end of training, and in brackets its minimum over every logged
step. s/epoch: a training epoch's wall time (the collapse monitor's counts every 5 steps
included, the epoch-end k-NN not), mean over each run's epochs, then over seeds.

{table}
"""
    replace_section(args.section, body)


if __name__ == "__main__":
    main()
