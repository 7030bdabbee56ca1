"""Plots of prototype collapse (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_collapse_over_training(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    eps_values: Sequence[float],
    path: str | Path,
) -> Path:
    """Unique-prototype percentage against training step, one panel per ε (paper Fig. 4).

    Args:
        histories: run label -> records with ``"step"`` and ``"unique_pct/eps=<eps>"`` keys
            (what :class:`protogmm.training.callbacks.CollapseMonitor` records).
        eps_values: the ε values to draw, one panel each.
        path: where to write the PNG.

    Returns:
        The path written.
    """
    path = Path(path)
    fig, axes = plt.subplots(
        1, len(eps_values), figsize=(3.2 * len(eps_values), 3.0), sharey=True, squeeze=False
    )
    for ax, eps in zip(axes[0], eps_values, strict=True):
        key = f"unique_pct/eps={eps:g}"
        for label, records in histories.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker=".", label=label)
        ax.set_title(f"ε = {eps:g}")
        ax.set_xlabel("training step")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("unique prototypes (% of K)")
    axes[0][-1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Unique prototypes over training (Definition 2.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
