"""Markdown tables: what the commands print and write, and the benchmarks' sections.

One implementation, used by ``protogmm`` (demo, compare, diagnose, eval) and by every
script under ``benchmarks/``. Pure Python: no torch or Lightning import, so a benchmark or a
notebook can format a run's ``summary.json`` without building a trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["demo_table", "markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
        header: the column titles.
        rows: the cells, already formatted, one sequence per row (as long as ``header``).

    Raises:
        ValueError: a row's length differs from the header's (names the row).
    """
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"markdown_table: row {index} has {len(row)} cells, the header {len(header)}"
            )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def demo_table(summaries: Mapping[str, Mapping[str, Any]], eps_values: Sequence[float]) -> str:
    """One Markdown table comparing runs (``protogmm demo``'s or ``compare``'s).

    One row per run (k-NN top-1, unique prototypes at each ε, seconds per epoch, peak
    memory), then the untrained-encoder and raw-pixel k-NN baselines of the first run.

    Args:
        summaries: each run's ``summary.json``, by row label (at least one).
        eps_values: the ε columns; the commands pass the collapse monitor's
            ``protogmm.training.callbacks.TRAINING_EPS`` (the keys its summaries hold).
            A parameter, not an import, so that this module stays free of Lightning.
    """
    eps_keys = [f"{eps:g}" for eps in eps_values]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    rows = []
    for label, summary in summaries.items():
        unique = summary.get("unique_pct", {})
        rows.append(
            [label, pct(summary.get("knn/top1"))]
            + [f"{unique[e]:.1f}" if e in unique else "n/a" for e in eps_keys]
            + [f"{summary.get('seconds_per_epoch') or 0:.1f}", f"{summary['peak_memory_mb']:.0f}"]
        )
    first = next(iter(summaries.values()))
    blanks = [""] * (len(eps_keys) + 2)
    rows.append(["untrained encoder", pct(first.get("knn/untrained")), *blanks])
    rows.append(["raw pixels", pct(first.get("knn/pixels")), *blanks])
    header = ["prototypes", "k-NN top-1"] + [f"unique % ε={e}" for e in eps_keys]
    return markdown_table(header + ["s/epoch", "peak MB"], rows)
