"""The run directory: one place that decides what every training run writes and where.

A run directory holds ``config.yaml`` (CLI runs), ``metrics.csv``, ``checkpoints/``
(``last.ckpt`` and the best k-NN checkpoint), ``summary.json``, ``report.md`` and the
collapse-over-training plot. Both ``protogmm fit`` and ``protogmm demo`` build their
trainers here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from protogmm.training.callbacks import CollapseMonitor, KNNMonitor, RunReport


def run_callbacks(dense_every_n_steps: int = 10) -> list[L.Callback]:
    """Monitors, report and checkpoints of every run (checkpoints go to ``run/checkpoints``)."""
    return [
        RunReport(),  # first: its epoch timer stops before the monitors' evaluation work
        KNNMonitor(),
        CollapseMonitor(dense_every_n_steps=dense_every_n_steps),
        ModelCheckpoint(
            save_last=True,
            monitor="knn/top1",
            mode="max",
            filename="best-knn-epoch={epoch}-top1={knn/top1:.4f}",
            auto_insert_metric_name=False,
        ),
    ]


def run_logger(run_dir: str | Path) -> CSVLogger:
    """``metrics.csv`` directly in ``run_dir`` (no ``version_N`` sub-folders)."""
    return CSVLogger(save_dir=str(run_dir), name="", version="")


def build_trainer(run_dir: str | Path, **trainer_kwargs: Any) -> L.Trainer:
    """A Trainer writing into ``run_dir`` with the standard callbacks and logger."""
    dense = trainer_kwargs.pop("dense_every_n_steps", 10)
    trainer_kwargs.setdefault("log_every_n_steps", 1)
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=run_logger(run_dir),
        callbacks=run_callbacks(dense) + list(trainer_kwargs.pop("callbacks", [])),
        **trainer_kwargs,
    )
