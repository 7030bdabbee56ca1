"""What every training step logs: the loss, the schedules and the health of the targets."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from protogmm.prototypes import OnlineGMM


@torch.no_grad()
def step_metrics(
    loss: Tensor, schedule: dict[str, float], targets: Tensor, mixture: OnlineGMM | None
) -> dict[str, Any]:
    """The loss, the schedules, the two failure modes of design.md §3 and the mixture's state.

    Args:
        loss: this step's loss.
        schedule: this step's per-step hyperparameters (logged as ``train/<key>``).
        targets: the teacher's targets ``[..., K]`` (probabilities over the prototypes).
        mixture: the decoupled run's mixture, or None.

    Returns:
        ``targets/sample_entropy`` (~log K: targets near uniform; ~0: one-hot),
        ``targets/marginal_entropy`` (its exp: the prototypes in use), ``targets/argmax_used``
        and, with a mixture, its beta, log-variance mean and spread, re-seeds and merges.
    """
    probs = targets.reshape(-1, targets.shape[-1]).float()
    sample_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
    marginal = probs.mean(0)
    marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    metrics: dict[str, Any] = {
        "train/loss": loss.detach(),
        **{f"train/{key}": value for key, value in schedule.items() if key != "freeze_prototypes"},
        "targets/sample_entropy": sample_entropy,
        "targets/marginal_entropy": marginal_entropy,
        "targets/argmax_used": float(probs.argmax(1).unique().numel()),
    }
    if mixture is not None:
        log_var = mixture.variances.log()
        per_component = log_var.mean(1) if log_var.ndim == 2 else log_var
        metrics.update(
            {
                "gmm/beta": mixture.beta,
                "gmm/log_var_mean": per_component.mean(),
                "gmm/log_var_spread": per_component.std() if per_component.numel() > 1 else 0.0,
                "gmm/reseeded": float(mixture.num_reseeded),
                "gmm/merged": float(mixture.num_merged),
            }
        )
    return metrics
