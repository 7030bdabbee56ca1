"""``protogmm compare``: one table and overlaid collapse plots across finished runs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from protogmm.diagnostics import plot_unique_vs_eps
from protogmm.diagnostics.plots import plot_collapse_over_training
from protogmm.reports import demo_table
from protogmm.training.callbacks import TRAINING_EPS


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """A run directory's ``summary.json`` and its unique-prototype history from metrics.csv.

    Args:
        run_dir: a run directory of ``protogmm fit`` or ``protogmm demo``.

    Raises:
        ValueError: the folder lacks ``summary.json`` or ``metrics.csv``.
    """
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    if not run_dir.is_dir() or not summary_path.is_file() or not metrics_path.is_file():
        raise ValueError(
            f"{run_dir}: not a protogmm run directory (needs summary.json and metrics.csv)"
        )
    history = []
    with open(metrics_path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k.startswith("unique_pct/") and v}
            if values:
                history.append({"step": float(row["step"]), **values})
    return json.loads(summary_path.read_text()), history


def run_compare(argv: list[str]) -> int:
    """``protogmm compare RUN_DIR...``: one table and overlaid collapse plots across runs."""
    parser = argparse.ArgumentParser(prog="protogmm compare", description=run_compare.__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("compare"))
    args = parser.parse_args(argv)
    summaries, histories = {}, {}
    for run_dir in args.runs:
        label = run_dir.name if run_dir.name not in summaries else str(run_dir)
        summaries[label], histories[label] = read_run(run_dir)
    table = demo_table(summaries, TRAINING_EPS)
    plot = plot_collapse_over_training(
        histories, TRAINING_EPS, args.out / "collapse_over_training.png"
    )
    # The final ε sweep of every run on one axis (paper Fig. 3a).
    sizes = {label: summary["num_prototypes"] for label, summary in summaries.items()}
    curves = {
        label: {float(e): round(p * sizes[label] / 100) for e, p in s["unique_pct"].items()}
        for label, s in summaries.items()
        if s.get("unique_pct")
    }
    plots = [plot]
    if curves:
        plots.append(plot_unique_vs_eps(curves, sizes, args.out / "unique_vs_eps.png"))
    print(table)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0
