"""Hosts: joint vs decoupled (and joint + KoLeo-proto) prototypes for DINO, iBOT and CARP.

    scripts/dev python -m benchmarks.hosts                     # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.hosts --quick             # smoke run (a few minutes)
    scripts/dev python -m benchmarks.hosts --backbone vit      # every host on iBOT's ViT

For each host, trains joint, decoupled and joint + KoLeo-proto prototypes at equal budget
(same data, crops, epochs, seeds and backbone; the ``protogmm fit`` module, data module and
trainer), then writes the "Hosts" section of BENCHMARKS.md: k-NN (k = 20, T = 0.07 and
k = 200, T = 0.1) beside the untrained encoder and raw pixels, unique prototypes
(Definition 2.1) at each ε at the end and their minimum over training, for iBOT also the
patch prototypes' unique % at the end, seconds per training epoch and training images per
second. Each host runs on its ``protogmm demo`` preset (DINO and CARP: the ConvNet; iBOT:
the ViT sized for 28 px), unless ``--backbone vit``. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from protogmm.cli import HOST_PRESETS
from protogmm.diagnostics import unique_prototype_curve
from protogmm.reports import markdown_table

from ._common import (
    column,
    command_line,
    machine_line,
    mean_std,
    quick_model,
    replace_section,
    reuse_or_train,
)

EPS = (0.025, 0.1, 0.25, 0.5)
HOSTS = ("dino", "ibot", "carp")


def variants(koleo_weight: float) -> dict[str, dict[str, Any]]:
    """Label -> PrototypicalSSL overrides of the three prototype kinds compared per host."""
    return {
        "joint": {"prototypes": "joint"},
        "decoupled": {"prototypes": "decoupled"},
        f"joint + KoLeo-proto {koleo_weight:g}": {
            "prototypes": "joint",
            "koleo_weight": koleo_weight,
        },
    }


def host_model(host: str, backbone: str) -> dict[str, Any]:
    """The host's overrides: its demo preset, or iBOT's ViT for every host."""
    model = {"host": host, **HOST_PRESETS[host]}
    if backbone == "vit":
        vit = HOST_PRESETS["ibot"]
        model.update({k: vit[k] for k in ("backbone", "backbone_kwargs")})
    return model


def patch_unique_pct(run_dir: Path, steps: int) -> dict[str, float] | None:
    """iBOT with separate patch prototypes: their unique % at each ε, from ``last.ckpt``.

    The teacher's set for joint prototypes (what the [CLS] monitor measures too), the patch
    mixture's means for decoupled; None when the run has no separate patch set.

    Raises:
        SystemExit: if the run has a patch set but ``last.ckpt`` is not from the run's last
            step (``steps``), e.g. a run from before ``last.ckpt`` was the last step's.
    """
    checkpoint = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    state = checkpoint["state_dict"]
    for key in ("teacher.patch.prototypes.weight", "patch.gmm.mean"):
        if key in state:
            if checkpoint["global_step"] != steps:
                raise SystemExit(
                    f"{run_dir}/checkpoints/last.ckpt is from step "
                    f"{checkpoint['global_step']}, not the run's last step {steps}"
                )
            prototypes = F.normalize(state[key].double(), dim=1)
            counts = unique_prototype_curve(prototypes, EPS)
            return {f"{e:g}": 100.0 * counts[e] / len(prototypes) for e in EPS}
    return None


def row(host: str, label: str, model: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    unique_end = [f"{statistics.mean(r['unique_pct'][f'{e:g}'] for r in runs):.1f}" for e in EPS]
    patch = [r["patch_unique_pct"] for r in runs if r.get("patch_unique_pct")]
    patch_end = (
        " / ".join(f"{statistics.mean(p[f'{e:g}'] for p in patch):.1f}" for e in EPS)
        if patch
        else ""
    )
    return [
        host,
        label,
        model.get("backbone", "convnet"),
        mean_std([r["knn/top1"] for r in runs], 100),
        mean_std([r["knn/top1_k200"] for r in runs], 100),
        " / ".join(unique_end),
        mean_std([min(column(r, "unique_pct/eps=0.025")) for r in runs]),
        patch_end,
        mean_std([r["seconds_per_epoch"] for r in runs], digits=1),
        mean_std([r["train_images"] / r["seconds_per_epoch"] for r in runs], digits=0),
    ]


HEADER = [
    "host",
    "prototypes",
    "backbone",
    "k-NN k=20",
    "k-NN k=200",
    "unique % at ε = " + " / ".join(f"{e:g}" for e in EPS) + " (end)",
    "min unique % ε=0.025 during training",
    "iBOT patch prototypes: unique % at the same ε (end)",
    "s/epoch",
    "train img/s",
]


def slug(label: str) -> str:
    """A run-directory name for a variant label ("joint + KoLeo-proto 0.1" -> "joint-koleo")."""
    return "joint-koleo" if "KoLeo" in label else label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", nargs="+", choices=HOSTS, default=list(HOSTS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--koleo-weight", type=float, default=0.1)
    parser.add_argument("--backbone", choices=("preset", "vit"), default="preset")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/hosts"))
    parser.add_argument("--quick", action="store_true", help="1 epoch on 256 images, 1 seed")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs in --out made with the same budget and settings (so several "
        "invocations with disjoint --hosts/--seeds can share the work, and a last one writes "
        "the section)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    data: dict[str, Any] = {"dataset": "mnist5k", "num_local_crops": 2, "batch_size": 128}
    if args.quick:
        args.epochs, args.seeds = 1, [0]
        data["max_train_samples"] = 256
    configs = variants(args.koleo_weight)

    rows, baselines = [], {}
    for host in args.hosts:
        base = host_model(host, args.backbone)
        for label, overrides in configs.items():
            runs = []
            for seed in args.seeds:
                run_dir = args.out / f"{host}-{slug(label)}-seed{seed}"
                run = reuse_or_train(
                    run_dir,
                    name=f"{host}, {label}, seed {seed}",
                    reuse=args.reuse,
                    epochs=args.epochs,
                    seed=seed,
                    model=(quick_model if args.quick else dict)(base | overrides),
                    data=data,
                )
                run["train_images"] = data["batch_size"] * run["steps"] / max(1, run["epochs"])
                run["patch_unique_pct"] = patch_unique_pct(run_dir, run["steps"])
                runs.append(run)
            rows.append(row(host, label, base | overrides, runs))
            baselines.setdefault(base.get("backbone", "convnet"), runs)

    for backbone, runs in baselines.items():
        rows.append(
            [f"untrained {backbone}", "", backbone]
            + [mean_std([r["knn/untrained"] for r in runs], 100)]
            + [mean_std([r["knn/untrained_k200"] for r in runs], 100)]
            + [""] * (len(HEADER) - 5)
        )
    first = next(iter(baselines.values()))
    rows.append(
        ["raw pixels", "", ""]
        + [mean_std([r["knn/pixels"] for r in first], 100)]
        + [mean_std([r["knn/pixels_k200"] for r in first], 100)]
        + [""] * (len(HEADER) - 5)
    )

    budget = (
        f"Budget per run: {args.epochs} epochs of MNIST-5k"
        f"{' (first 256 training images)' if args.quick else ' (4,000 training images)'}, "
        "batch 128, 2 global (28 px) + 2 local crops, K = 1024, d = 128, AdamW lr 1e-3; "
        "CARP blocks of 128 (temperature 0.1); iBOT masks 0.1-0.5 of the patches on half "
        f"of the images, separate patch prototypes; KoLeo-proto weight {args.koleo_weight:g}; "
        f"seeds {args.seeds}. Mean ± std over seeds. s/epoch is training time only (the "
        "k-NN monitor excluded); img/s = training images per second."
    )
    section = "\n\n".join(
        [
            "### Joint vs decoupled vs joint + KoLeo-proto, per host (`benchmarks/hosts.py`)",
            f"Command: `{command_line()}`  \nMachine: {machine_line()}  \n{budget}",
            markdown_table(HEADER, rows),
        ]
    )
    print(section)
    if not args.no_write and not args.quick:
        replace_section("hosts", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
