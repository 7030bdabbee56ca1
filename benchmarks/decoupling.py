"""Decoupling at small scale: joint vs decoupled DINO on the embedded data, with ablations.

    scripts/dev python -m benchmarks.decoupling                 # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.decoupling --quick         # smoke run (~1 minute)

Trains every configuration below with the same ConvNet, data, crops, budget and seeds (the
``protogmm fit`` module, data module and trainer), then writes the "Decoupling at small
scale" section of BENCHMARKS.md: k-NN (DINO's k = 20, T = 0.07 and lightly's k = 200,
T = 0.1) beside the untrained encoder and raw pixels, unique prototypes (Definition 2.1) at
each ε at the end and their minimum over training, the teacher targets' per-sample and
batch-mean entropy, the number of prototypes used as argmax, and the collapse-over-training
plot (paper Fig. 4) under ``docs/``. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from protogmm.diagnostics.plots import plot_collapse_over_training
from protogmm.reports import markdown_table

from ._common import (
    add_labels_argument,
    column,
    command_line,
    machine_line,
    mean_std,
    quick_model,
    replace_section,
    reuse_or_train,
)

EPS = (0.025, 0.1, 0.25, 0.5)

#: The head-to-head comparison (every seed): label -> PrototypicalSSL overrides.
MAIN: dict[str, dict[str, Any]] = {
    "joint": {"prototypes": "joint"},
    "decoupled": {"prototypes": "decoupled"},
}

#: Levers on the joint baseline and ablations of the decoupled design (``--ablation-seeds``,
#: ``--ablations``): label -> overrides.
ABLATIONS: dict[str, dict[str, Any]] = {
    "joint, K = 16384": {"prototypes": "joint", "num_prototypes": 16384},
    "joint, teacher momentum 0.99": {"prototypes": "joint", "teacher_momentum": 0.99},
    "decoupled, teacher momentum 0.99": {"prototypes": "decoupled", "teacher_momentum": 0.99},
    "posterior targets": {"prototypes": "decoupled", "targets": "posterior"},
    "posterior + Sinkhorn": {
        "prototypes": "decoupled",
        "targets": "posterior",
        "target_balancing": "sinkhorn",
    },
    "centred GMM": {"prototypes": "decoupled", "gmm": {"center_momentum": 0.9}},
    "forgetting: time": {"prototypes": "decoupled", "gmm": {"forgetting": "time"}},
    "forgetting: none": {"prototypes": "decoupled", "gmm": {"forgetting": "none"}},
    "no annealing (β = 1)": {"prototypes": "decoupled", "gmm_anneal_fraction": 0.0},
    "isotropic covariance": {"prototypes": "decoupled", "gmm": {"covariance": "isotropic"}},
    "uniform mixing weights": {"prototypes": "decoupled", "gmm": {"mixing": "uniform"}},
    # CAPI-style partial decoupling (Darcet et al. 2025): the teacher's prototypes are trained
    # by their own clustering loss, the student's jointly; between joint and decoupled.
    "partial (CAPI-style)": {"prototypes": "partial"},
    # Split and merge is the default (OnlineGMM.merge_overlap, reseed_min_share): this row
    # turns it off.
    "no split and merge (plain online EM)": {
        "prototypes": "decoupled",
        "gmm": {"merge_overlap": None, "reseed_min_share": None},
    },
    # A ConvNet head without BN (DINO's ViT head), a teacher that follows the student within
    # this short run (momentum 0.9: a 10-step EMA, against 0.996's 250 steps of DINO's 125k)
    # and the joint levers: the prototype count falls, but because the teacher's embeddings
    # collapse to one point (benchmarks.live_prototypes: the data's reference is 0.1 %).
    "joint, no BN in head, teacher momentum 0.9, init 0.1, lr ×10": {
        "prototypes": "joint",
        "head_bn": False,
        "teacher_momentum": 0.9,
        "prototype_init_scale": 0.1,
        "prototype_lr_multiplier": 10.0,
    },
    # The same levers one (or a few) at a time (BENCHMARKS "What the unique count measures").
    "joint, teacher momentum 0.9": {"prototypes": "joint", "teacher_momentum": 0.9},
    "joint, no BN in head, init 0.1, lr ×10": {
        "prototypes": "joint",
        "head_bn": False,
        "prototype_init_scale": 0.1,
        "prototype_lr_multiplier": 10.0,
    },
    "joint, teacher momentum 0.95, init 0.1, lr ×10": {
        "prototypes": "joint",
        "teacher_momentum": 0.95,
        "prototype_init_scale": 0.1,
        "prototype_lr_multiplier": 10.0,
    },
    "joint, init 0.1, lr ×10": {
        "prototypes": "joint",
        "prototype_init_scale": 0.1,
        "prototype_lr_multiplier": 10.0,
    },
    "joint, init 0.1, lr ×10, schedules for 4× the run": {
        "prototypes": "joint",
        "prototype_init_scale": 0.1,
        "prototype_lr_multiplier": 10.0,
        "schedule_steps": 620,
    },
    "decoupled, no BN in head, teacher momentum 0.9, centred GMM": {
        "prototypes": "decoupled",
        "head_bn": False,
        "teacher_momentum": 0.9,
        "gmm": {"center_momentum": 0.9},
    },
    # Merging kept, stranded components left where they are.
    "no re-seeding of stranded components": {
        "prototypes": "decoupled",
        "gmm": {"reseed_min_share": None},
    },
}


def describe(overrides: dict[str, Any]) -> str:
    """The overrides (flat, as :data:`ABLATIONS` writes them) as ``protogmm fit`` flags."""
    from protogmm.training.legacy_hparams import upgrade_model_hparams

    upgraded, flags = upgrade_model_hparams(overrides), []
    for key in ("host", "prototypes"):
        spec = upgraded.pop(key)
        if key in overrides:
            flags.append(f"--model.{key} {spec['class_path'].rsplit('.', 1)[1]}")
        flags += _flags(f"model.{key}", spec["init_args"])
    flags += _flags("model", {k: v for k, v in upgraded.items() if k in overrides})
    return "`" + " ".join(flags) + "`"


def _flags(prefix: str, values: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in values.items():
        if isinstance(value, dict):
            flags += _flags(f"{prefix}.{key}", value)
        else:
            flags.append(f"--{prefix}.{key} {_flag(value)}")
    return flags


def _flag(value: Any) -> str:
    return "null" if value is None else str(value)


def last(summary: dict[str, Any], key: str) -> float:
    values = column(summary, key)
    return values[-1] if values else math.nan


def row(label: str, overrides: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    unique_end = [f"{statistics.mean(r['unique_pct'][f'{e:g}'] for r in runs):.1f}" for e in EPS]
    return [
        label,
        describe(overrides),
        mean_std([r["knn/top1"] for r in runs], 100),
        mean_std([r["knn/top1_k200"] for r in runs], 100),
        " / ".join(unique_end),
        mean_std([min(column(r, "unique_pct/eps=0.025")) for r in runs]),
        mean_std([last(r, "targets/sample_entropy") for r in runs], digits=2),
        mean_std([last(r, "targets/marginal_entropy") for r in runs], digits=2),
        mean_std([last(r, "targets/argmax_used") for r in runs], digits=0),
        mean_std([r["seconds_per_epoch"] for r in runs], digits=0),
    ]


HEADER = [
    "run",
    "`protogmm fit` overrides",
    "k-NN k=20",
    "k-NN k=200",
    "unique % at ε = " + " / ".join(f"{e:g}" for e in EPS) + " (end)",
    "min unique % ε=0.025 during training",
    "sample H",
    "marginal H",
    "used",
    "s/epoch",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-prototypes", type=int, default=1024, help="K unless a row says")
    parser.add_argument(
        "--dense-every", type=int, default=5, help="log unique %% every N steps (diagnostics only)"
    )
    parser.add_argument(
        "--section",
        default="decoupling",
        help="the BENCHMARKS.md block to own (a second budget gets its own block)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    add_labels_argument(parser, "--ablations", list(ABLATIONS), "which ablation rows to run")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/decoupling"))
    parser.add_argument("--plot", type=Path, default=Path("docs/decoupling-collapse.png"))
    parser.add_argument("--quick", action="store_true", help="1 epoch on 256 images, 1 seed")
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished runs of the same budget in --out"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    data: dict[str, Any] = {
        "dataset": "mnist5k",
        "num_local_crops": 2,
        "batch_size": args.batch_size,
    }
    if args.quick:
        args.epochs, args.seeds, args.ablation_seeds = 1, [0], [0]
        data["max_train_samples"] = 256
        ablations = {"posterior targets": ABLATIONS["posterior targets"]}
    else:
        ablations = {label: ABLATIONS[label] for label in args.ablations}

    def run_one(label: str, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
        if (label, seed) in results:
            return results[(label, seed)]
        return reuse_or_train(
            args.out / f"{label.replace(' ', '_')}-seed{seed}",
            name=f"{label}, seed {seed}",
            reuse=args.reuse,
            epochs=args.epochs,
            seed=seed,
            model=(quick_model if args.quick else dict)(
                {"num_prototypes": args.num_prototypes, **overrides}
            ),
            data=data,
            dense_every_n_steps=args.dense_every,
        )

    def run_all(configs: dict[str, dict[str, Any]], seeds: list[int]) -> list[list[str]]:
        # Seeds outside, configurations inside: a run cut short still has matched pairs.
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
        for seed in seeds:
            for label, overrides in configs.items():
                runs[label].append(run_one(label, overrides, seed))
                results[(label, seed)] = runs[label][-1]
        return [row(label, overrides, runs[label]) for label, overrides in configs.items()]

    def baseline_rows(seeds: list[int]) -> list[list[str]]:
        first = [results[("joint", s)] for s in seeds]
        return [
            ["untrained encoder", "", mean_std([r["knn/untrained"] for r in first], 100)]
            + [mean_std([r["knn/untrained_k200"] for r in first], 100)]
            + [""] * (len(HEADER) - 4),
            ["raw pixels", "", mean_std([r["knn/pixels"] for r in first], 100)]
            + [mean_std([r["knn/pixels_k200"] for r in first], 100)]
            + [""] * (len(HEADER) - 4),
        ]

    def section(
        main_rows: list[list[str]],
        seeds: list[int],
        ablation_rows: list[list[str]],
        ablations_done: bool,
    ) -> str:
        if ablation_rows:
            ablation_text = markdown_table(HEADER, ablation_rows)
            if not ablations_done:
                ablation_text += "\n\n(ablations still running when this was written)"
        elif ablations_done:
            ablation_text = "(not run)"
        else:
            ablation_text = "(ablations still running when this was written)"
        which_ablations = f"ablations: seeds {args.ablation_seeds}" if ablations else "no ablations"
        return "\n\n".join(
            [
                "## Decoupling at small scale (joint vs decoupled DINO, MNIST-5k, "
                f"{args.epochs} epochs at batch {args.batch_size}, K = {args.num_prototypes})",
                f"Command: `{command_line()}`  \nMachine: {machine_line()}  \n"
                f"Budget: {args.epochs} epochs, batch {args.batch_size}, 2 global + 2 local "
                f"crops, ConvNet, K = {args.num_prototypes} unless stated, d = 128; "
                f"seeds {seeds} of {args.seeds} ({which_ablations}). "
                "Mean ± std over seeds. Entropies in nats "
                f"(log K = {math.log(args.num_prototypes):.2f}): per-sample and "
                "batch-mean entropy of the teacher targets at the last step; 'used' = distinct "
                "argmax targets in the last batch.",
                markdown_table(HEADER, main_rows),
                f"Unique prototypes over training (seed {args.seeds[0]}): ![collapse]({args.plot})",
                "### Levers on the joint baseline, ablations of the decoupled design",
                ablation_text,
            ]
        )

    def publish(text: str) -> None:
        print(text, flush=True)
        if not args.no_write and not args.quick:
            replace_section(args.section, text)

    # The head-to-head is written after every seed; each ablation row as it lands.
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for count in range(1, len(args.seeds) + 1):
        seeds = args.seeds[:count]
        main_rows = run_all(MAIN, seeds) + baseline_rows(seeds)
        if count == 1:
            histories = {label: results[(label, seeds[0])]["rows"] for label in MAIN}
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot_collapse_over_training(histories, EPS, args.plot)
        publish(section(main_rows, seeds, [], not (args.ablation_seeds and ablations)))
    ablation_rows: list[list[str]] = []
    if args.ablation_seeds:
        for label, overrides in ablations.items():
            ablation_rows += run_all({label: overrides}, args.ablation_seeds)
            done = len(ablation_rows) == len(ablations)
            publish(section(main_rows, args.seeds, ablation_rows, done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
