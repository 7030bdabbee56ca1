"""The collapse monitor: unique prototypes (Definition 2.1) over an ε sweep during training."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from protogmm.diagnostics import unique_prototype_curve

#: The ε sweep logged during training (paper Fig. 3a uses 0.025 ... 0.5).
TRAINING_EPS = (0.025, 0.1, 0.25, 0.5)


def eps_key(eps: float) -> str:
    """Metric name of the unique-prototype percentage at ``eps``."""
    return f"unique_pct/eps={eps:g}"


#: The collapse monitor's dense period is ``dense_every_n_steps`` up to this K and grows
#: with K beyond it, so that its share of a step stays bounded.
DENSE_REFERENCE_K = 4096


class CollapseMonitor(L.Callback):
    """Unique prototypes (Definition 2.1) over an ε sweep, densely early and every epoch.

    Collapse of joint prototypes happens early (paper §4.3), so during the first
    ``dense_epochs`` epochs the sweep is measured every ``dense_every_n_steps`` steps
    (times ``ceil(K / 4096)``: at K = 65,536 every 160 steps), and at every epoch end
    afterwards. Rank 0 measures (its logger is the one that writes); the other ranks skip
    it. Logged as ``unique_pct/eps=...`` (percent of K).
    """

    def __init__(
        self,
        eps_values: tuple[float, ...] = TRAINING_EPS,
        dense_every_n_steps: int = 10,
        dense_epochs: int = 1,
    ) -> None:
        self.eps_values = tuple(eps_values)
        self.dense_every_n_steps = dense_every_n_steps
        self.dense_epochs = dense_epochs
        self.history: list[dict[str, float]] = []

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not pl_module.prototypes_fitted():
            return  # a mixture not yet fitted holds random placeholder means
        prototypes = pl_module.prototype_vectors().cpu()
        counts = unique_prototype_curve(prototypes, self.eps_values)
        k = prototypes.shape[0]
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        record.update({eps_key(eps): 100.0 * counts[eps] / k for eps in self.eps_values})
        if self.history and self.history[-1]["step"] == record["step"]:
            return
        self.history.append(record)
        for logger in trainer.loggers:
            logger.log_metrics(
                {key: value for key, value in record.items() if key != "step"},
                step=trainer.global_step,
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not when resuming: the step counter is restored only after this hook, so the
        # restored prototypes would be logged (and plotted) as step 0.
        if trainer.global_step == 0 and trainer.ckpt_path is None:
            self._measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        k = int(getattr(pl_module, "hparams", {}).get("num_prototypes", DENSE_REFERENCE_K))
        every = self.dense_every_n_steps * max(1, math.ceil(k / DENSE_REFERENCE_K))
        if trainer.current_epoch < self.dense_epochs and trainer.global_step % every == 0:
            self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
