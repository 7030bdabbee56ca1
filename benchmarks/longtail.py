"""Long tail: joint vs decoupled DINO on a long-tailed MNIST-5k, per head / medium / tail group.

    scripts/dev python -m benchmarks.longtail                  # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.longtail --quick          # smoke run (a few minutes)
    scripts/dev python -m benchmarks.longtail --rho 100 --seeds 0 1 2 --epochs 15 \\
        --model '{"num_prototypes": 4096}'

The training split of the embedded MNIST-5k (400 digits per class) is subsampled to
``n_c = floor(400 * rho ** (-c / 9))`` digits of class ``c`` (``data.imbalance.ratio``;
rho = 10: 400, 309, 239, 185, 143, 111, 86, 66, 51, 40); the held-out split stays balanced
(100 per class). Both configurations get the same ConvNet, crops, seeds and budget (the
``protogmm fit`` module, data module and trainer). Classes are grouped by training
frequency into three equal bands of log-frequency: many > ``400 * rho ** (-1/3)``, few <
``400 * rho ** (-2/3)`` (the literature's 100 / 20 would leave no few-shot class at rho =
10; see :mod:`protogmm.evaluation.longtail`).

The section written to BENCHMARKS.md ("Long tail") holds, per group (mean ± std over
seeds): k-NN (k = 20, T = 0.07) and linear-probe accuracy of the trained teacher backbone
beside the untrained encoder and raw pixels, and the number of distinct prototypes the
group's training images are assigned to (argmax of the teacher's cosine scores), raw, per
class and per 100 images; then unique prototypes (Definition 2.1) at ε = 0.025 / 0.1 /
0.25 / 0.5 at the end of training. The diversity is measured again from each run's
checkpoint with today's measure (the teacher's BatchNorm on batch statistics, as in
training: :func:`protogmm.training.longtail_eval.teacher_prototype_diversity`), so reused
runs read as new ones; the accuracies are those of the run's ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from protogmm.evaluation import GROUPS
from protogmm.reports import markdown_table
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import datamodule_from_checkpoint
from protogmm.training.longtail_eval import teacher_prototype_diversity

from ._common import (
    command_line,
    machine_line,
    mean_std,
    quick_model,
    replace_section,
    reuse_or_train,
)

EPS = ("0.025", "0.1", "0.25", "0.5")
ROWS = ("many", "medium", "few", "all")
KINDS = ("joint", "decoupled")
BASELINES = ("untrained encoder", "raw pixels")


def stat(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """mean ± std over seeds, or '–' where a group is empty."""
    present = [v for v in values if v is not None]
    return mean_std(present, scale, digits) if present else "–"


def accuracy_table(runs: dict[str, list[dict[str, Any]]], protocol: str) -> str:
    """Per-group accuracy (%) of each trained configuration, then the two baselines."""
    rows = []
    for kind in KINDS:
        results = [r["longtail"]["results"]["trained"] for r in runs[kind]]
        rows.append([kind] + [stat([x[protocol][g] for x in results], 100) for g in ROWS])
    for baseline in BASELINES:
        # Same architecture and seed for both kinds: the joint runs' baselines are shown.
        results = [r["longtail"]["results"][baseline] for r in runs["joint"]]
        rows.append([baseline] + [stat([x[protocol][g] for x in results], 100) for g in ROWS])
    return markdown_table(["encoder", *ROWS], rows)


def diversity_table(runs: dict[str, list[dict[str, Any]]], num_prototypes: int) -> str:
    """Distinct prototypes per group: raw (of K), per class, per 100 training images."""
    rows = []
    for kind in KINDS:
        diversity = [r["longtail"]["results"]["trained"]["prototypes"] for r in runs[kind]]
        for measure, scale, digits in (
            ("distinct", 1.0, 0),
            ("per_class", 1.0, 1),
            ("per_sample", 100.0, 1),
        ):
            label = {
                "distinct": f"distinct (of K = {num_prototypes})",
                "per_class": "per class",
                "per_sample": "per 100 images",
            }[measure]
            rows.append(
                [kind, label]
                + [stat([d[g][measure] for d in diversity], scale, digits) for g in ROWS]
            )
    return markdown_table(["prototypes", "measure", *ROWS], rows)


def diversity_now(run_dir: Path) -> dict[str, Any]:
    """The run's prototype diversity per group by today's measure, from its checkpoint."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return teacher_prototype_diversity(
        load_module(checkpoint), datamodule_from_checkpoint(checkpoint)
    )


def unique_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        [kind] + [stat([r["unique_pct"][e] for r in runs[kind]]) for e in EPS] for kind in KINDS
    ]
    return markdown_table(["prototypes", *[f"unique % ε={e}" for e in EPS]], rows)


def groups_line(summary: dict[str, Any], counts: list[int]) -> str:
    longtail = summary["longtail"]
    parts = []
    for group in GROUPS:
        classes = longtail["groups"][group]["classes"]
        shown = ", ".join(f"{c} ({counts[c]})" for c in classes) or "none"
        parts.append(f"{group}: {shown}")
    return (
        f"Groups (class (training images)), many > {longtail['many_threshold']:.1f}, "
        f"few < {longtail['few_threshold']:.1f}: " + "; ".join(parts) + "."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=10.0, help="imbalance ratio (default 10)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--model",
        type=json.loads,
        default={},
        help="extra PrototypicalSSL overrides for both runs, as JSON: '{\"num_prototypes\": 4096}'",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/longtail"))
    parser.add_argument("--quick", action="store_true", help="1 epoch on 256 images, 1 seed")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs in --out made with the same epochs, data and --model "
        "overrides (and, decoupled, the mixture settings OnlineGMM resolves today)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    if not isinstance(args.model, dict) or "prototypes" in args.model:
        parser.error("--model must be a JSON object without 'prototypes' (both kinds are run)")
    data: dict[str, Any] = {
        "dataset": "mnist5k",
        "num_local_crops": 2,
        "imbalance": {"ratio": args.rho},
        # Three equal bands of log-frequency (see the module docstring).
        "longtail": {"thresholds": (args.rho ** (-1 / 3), args.rho ** (-2 / 3)), "relative": True},
    }
    if args.quick:
        args.epochs, args.seeds = 1, [0]
        data["max_train_samples"] = 256  # pretraining images; k-NN and probes see all

    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    # Seeds outside, kinds inside: a benchmark cut short still has matched pairs to reuse.
    for seed in args.seeds:
        for kind in KINDS:
            run_dir = args.out / f"{kind}-rho{args.rho:g}-seed{seed}"
            summary = reuse_or_train(
                run_dir,
                name=f"{kind}, rho {args.rho:g}, seed {seed}",
                reuse=args.reuse,
                epochs=args.epochs,
                seed=seed,
                model=(quick_model if args.quick else dict)({"prototypes": kind, **args.model}),
                data=data,
                required_key="longtail",
            )
            if "longtail" not in summary:
                raise SystemExit(f"{run_dir}: no long-tail analysis in summary.json")
            summary["class_counts"] = json.loads((run_dir / "class_counts.json").read_text())
            summary["longtail"]["results"]["trained"]["prototypes"] = diversity_now(run_dir)
            runs[kind].append(summary)

    first = runs["joint"][0]
    counts = first["class_counts"]["counts"]
    k = first["num_prototypes"]
    steps = first["steps"]
    section = "\n\n".join(
        [
            "## Long tail (joint vs decoupled DINO, long-tailed MNIST-5k)",
            f"Command: `{command_line()}`  \nMachine: {machine_line()}  \n"
            f"Data: MNIST-5k training split subsampled to rho = {args.rho:g} "
            f"(n_c = floor(400 · rho^(-c/9)): {', '.join(map(str, counts))}; "
            f"{sum(counts)} images), held-out split balanced (100 per class). "
            f"Budget: {args.epochs} epochs ({steps} steps), batch 128, 2 global + 2 local "
            f"crops, ConvNet, K = {k}, d = 128"
            + (f", model overrides `{json.dumps(args.model)}`" if args.model else "")
            + f"; seeds {args.seeds}; mean ± std over seeds.  \n"
            + groups_line(first, counts),
            "k-NN top-1 (%, k = 20, T = 0.07) on held-out digits of each group's classes "
            "(memory bank: the long-tailed training split):",
            accuracy_table(runs, "knn"),
            "Linear probe top-1 (%, 100 epochs, trained on the long-tailed training split):",
            accuracy_table(runs, "linear"),
            "Prototype diversity: distinct prototypes the group's training images are "
            "assigned to (argmax of the teacher's cosine scores):",
            diversity_table(runs, k),
            "Unique prototypes (Definition 2.1) at the end of training:",
            unique_table(runs),
        ]
    )
    print(section)
    if not args.no_write and not args.quick:
        replace_section("longtail", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
