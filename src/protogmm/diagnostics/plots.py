"""Collapse over training (paper Fig. 4): unique prototypes against the training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from protogmm.diagnostics.geometry import save_figure_atomically


def plot_collapse_over_training(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    eps_values: Sequence[float],
    path: str | Path,
) -> Path:
    """Unique-prototype percentage against training step, one panel per ε (paper Fig. 4).

    Uses matplotlib's object API (no pyplot, no backend switch) and writes atomically.

    Args:
        histories: run label -> records with ``"step"`` and ``"unique_pct/eps=<eps>"`` keys
            (what :class:`protogmm.training.callbacks.CollapseMonitor` records, or rows of a
            run's ``metrics.csv``).
        eps_values: the ε values to draw, one panel each.
        path: where to write the PNG.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(3.2 * len(eps_values), 3.0))
    axes = fig.subplots(1, len(eps_values), sharey=True, squeeze=False)[0]
    for ax, eps in zip(axes, eps_values, strict=True):
        key = f"unique_pct/eps={eps:g}"
        for label, records in histories.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker=".", label=label)
        ax.set_title(f"ε = {eps:g}")
        ax.set_xlabel("training step")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("unique prototypes (% of K)")
    axes[-1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Unique prototypes over training (Definition 2.1)")
    fig.tight_layout()
    return save_figure_atomically(fig, path)
