"""``protogmm compare``: one table and overlaid collapse plots across finished runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from protogmm.cli.command_line import CommandParser
from protogmm.diagnostics import plot_unique_vs_eps
from protogmm.diagnostics.plots import plot_collapse_over_training
from protogmm.reports import demo_table
from protogmm.training.callbacks import TRAINING_EPS
from protogmm.training.run_logger import TENSORBOARD_EVENTS


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """A run directory's ``summary.json`` and its unique-prototype history, from
    ``metrics.csv`` or, for a run logged with ``--logger tensorboard``, its event files.

    Args:
        run_dir: a run directory of ``protogmm fit`` or ``protogmm demo``.

    Raises:
        ValueError: the folder lacks ``summary.json``, or both ``metrics.csv`` and events.
    """
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    events = sorted(run_dir.glob(TENSORBOARD_EVENTS))
    if not run_dir.is_dir() or not summary_path.is_file() or not (metrics_path.is_file() or events):
        raise ValueError(
            f"{run_dir}: not a protogmm run directory (needs summary.json, and metrics.csv or "
            "TensorBoard event files)"
        )
    if metrics_path.is_file():
        history = _csv_history(metrics_path)
    else:
        history = _tensorboard_history(events)
    return json.loads(summary_path.read_text()), history


def _csv_history(path: Path) -> list[dict[str, float]]:
    history = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k.startswith("unique_pct/") and v}
            if values:
                history.append({"step": float(row["step"]), **values})
    return history


def _tensorboard_history(paths: list[Path]) -> list[dict[str, float]]:
    """The ``unique_pct/*`` scalars of the event files, one row per step (a resumed run's
    later file wins where steps repeat)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[int, dict[str, float]] = {}
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("unique_pct/"):
                for event in events.Scalars(tag):
                    rows.setdefault(event.step, {"step": float(event.step)})[tag] = event.value
    return [rows[step] for step in sorted(rows)]


def run_compare(argv: list[str]) -> int:
    """``protogmm compare RUN_DIR...``: one table and overlaid collapse plots across runs."""
    parser = CommandParser(prog="protogmm compare", description=run_compare.__doc__)
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
