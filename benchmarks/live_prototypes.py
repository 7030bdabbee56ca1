"""What Definition 2.1 counts on this data: live prototypes and the data's own reference.

    scripts/dev python -m benchmarks.live_prototypes                 # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.live_prototypes --runs DIR ...  # any finished runs

Reads finished runs (``<run>/checkpoints/last.ckpt``, e.g. those of ``benchmarks.decoupling``
and ``benchmarks.data_sets``) and embeds the run's own training split (no augmentation) with
its teacher, its BatchNorm layers on batch statistics as in training
(:mod:`protogmm.evaluation.features`). Per run:

- the unique % of its prototypes at each ε (Definition 2.1, what the run reports);
- live: the prototypes that are the teacher's choice (highest cosine score, the argmax of
  its targets) for at least one training image, and the unique % among them;
- the data's reference: the unique % of K of those embeddings drawn at random
  (:func:`protogmm.diagnostics.data_reference_curve`), what K prototypes lying on the data
  would count.

A prototype that no image chooses still counts as unique; the reference says how unique a
set that lies on the data can be. Rows are grouped by kind (the run folder's name without
its seed) with mean ± std over the seeds found.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch

from protogmm.diagnostics import data_reference_curve, unique_prototype_curve
from protogmm.reports import markdown_table
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import datamodule_from_checkpoint

from ._common import command_line, machine_line, mean_std, replace_section

EPS = (0.025, 0.1, 0.25, 0.5)
#: The runs of the section: MNIST-5k (benchmarks.decoupling, 3 seeds; two ablations at seed
#: 0; its 15-epoch section, 3 seeds) and MNIST-5k inverted (benchmarks.data_sets, seed 0).
DEFAULT_RUNS = [
    *(
        f"runs/benchmarks/decoupling/{kind}-seed{seed}"
        for kind in ("joint", "decoupled", "no_split_and_merge_(plain_online_EM)")
        for seed in (0, 1, 2)
    ),
    *(
        f"runs/benchmarks/decoupling/{label.replace(' ', '_')}-seed0"
        for label in (
            "joint, no BN in head, teacher momentum 0.9, init 0.1, lr ×10",
            "decoupled, no BN in head, teacher momentum 0.9, centred GMM",
        )
    ),
    *(
        f"runs/benchmarks/decoupling-15ep/{kind}-seed{seed}"
        for kind in ("joint", "decoupled")
        for seed in (0, 1, 2)
    ),
    *(
        f"runs/benchmarks/data_sets/MNIST-5k_inverted-{kind}-seed0"
        for kind in ("joint", "decoupled", "decoupled-no-split-merge")
    ),
]


def measure(run_dir: Path) -> dict[str, list[float] | float]:
    """One run's percentages at each ε (prototypes, live ones, the data's reference)."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    module = load_module(checkpoint)
    data = datamodule_from_checkpoint(checkpoint)
    train_loader, _ = data.knn_dataloaders()
    embeddings, _ = module.teacher_embeddings(train_loader)
    prototypes = module.teacher_prototype_set().prototypes().detach()
    with torch.no_grad():
        choice = torch.cat(
            [module.teacher_prototype_set()(chunk).argmax(dim=1) for chunk in embeddings.split(512)]
        )
    live = choice.unique()
    k = prototypes.shape[0]

    def percent(curve: dict[float, int], size: int) -> list[float]:
        return [100.0 * curve[eps] / size for eps in EPS]

    reference, drawn = data_reference_curve(embeddings, k, EPS)
    return {
        "all": percent(unique_prototype_curve(prototypes, EPS), k),
        "live": float(live.numel()),
        "live unique": percent(unique_prototype_curve(prototypes[live], EPS), live.numel()),
        "reference": percent(reference, drawn),
        "K": float(k),
        "images": float(embeddings.shape[0]),
    }


def _curve(results: list[dict], key: str) -> str:
    return " / ".join(f"{statistics.mean(r[key][i] for r in results):.1f}" for i in range(len(EPS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, nargs="+", default=[Path(p) for p in DEFAULT_RUNS])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = {}
    for run_dir in args.runs:
        if not (run_dir / "checkpoints" / "last.ckpt").exists():
            print(f"skipped (no last.ckpt): {run_dir}")
            continue
        kind = run_dir.parent.name + "/" + re.sub(r"-seed\d+$", "", run_dir.name)
        groups.setdefault(kind, []).append(measure(run_dir))
        print(f"measured {run_dir}", flush=True)
    eps_text = " / ".join(f"{eps:g}" for eps in EPS)
    rows = [
        [
            kind,
            str(len(results)),
            f"{results[0]['K']:.0f}",
            _curve(results, "all"),
            mean_std([r["live"] for r in results], digits=0),
            _curve(results, "live unique"),
            _curve(results, "reference"),
        ]
        for kind, results in groups.items()
    ]
    table = markdown_table(
        [
            "runs (folder/kind)",
            "seeds",
            "K",
            f"unique % of all, ε = {eps_text}",
            "live (chosen by ≥ 1 image)",
            "unique % of the live ones",
            "reference: K embeddings drawn at random",
        ],
        rows,
    )
    body = "\n".join(
        [
            "### What the unique count measures on this data",
            "",
            f"`{command_line()}` ({machine_line()}). Each run's teacher embeds its own "
            "training split (no augmentation), BatchNorm on batch statistics as in "
            "training; live = prototypes that are the teacher's "
            "highest-cosine choice for at least one image; the reference is Definition 2.1 "
            "over K of those embeddings drawn at random (seed 0), what K prototypes lying "
            "on the data would count. Percentages are means over the seeds.",
            "",
            table,
        ]
    )
    print(body)
    if not args.no_write:
        replace_section("live-prototypes", body)


if __name__ == "__main__":
    main()
