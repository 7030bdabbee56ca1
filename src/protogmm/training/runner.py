"""The run directory: one place that decides what every training run writes and where.

A run directory holds ``config.yaml`` (CLI runs), ``metrics.csv``, ``checkpoints/``
(``last.ckpt`` and the best k-NN checkpoint), ``summary.json``, ``report.md`` and the
collapse-over-training plot. Both ``protogmm fit`` and ``protogmm demo`` build their
trainers here, with the same callbacks: monitors, checkpoints written atomically
(:class:`~protogmm.training.reliability.AtomicCheckpointIO`), the non-finite guard and the
DDP bookkeeping (:class:`~protogmm.training.distributed.DistributedRun`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from protogmm._checks import check_positive_int
from protogmm.training.callbacks import CollapseMonitor, KNNMonitor, RunReport
from protogmm.training.distributed import DistributedRun
from protogmm.training.reliability import (
    AtomicCheckpointIO,
    DataPosition,
    NonFiniteAction,
    NonFiniteGuard,
)
from protogmm.training.run_logger import RunCSVLogger


def run_callbacks(
    dense_every_n_steps: int = 10,
    checkpoint_every_n_steps: int = 0,
    on_nonfinite: NonFiniteAction = "stop",
    knn_every_n_epochs: int = 1,
    baseline_memory_mb: float = 2048.0,
) -> list[L.Callback]:
    """Monitors, report, guard and checkpoints of every run (in ``run/checkpoints``).

    Args:
        dense_every_n_steps: the collapse monitor's period during its dense first epoch(s)
            (times ``ceil(K / 4096)``).
        checkpoint_every_n_steps: also write ``last.ckpt`` every this many steps (0: at
            epoch ends only). Mid-epoch checkpoints resume exactly (the data position is
            saved), so a crash costs at most this many steps.
        on_nonfinite: ``"stop"`` or ``"skip"`` (see :class:`NonFiniteGuard`).
        knn_every_n_epochs: the k-NN monitor's period in epochs.
        baseline_memory_mb: the untrained-encoder and raw-pixel k-NN baselines run only if
            their features over the k-NN bank fit this (else one log line says why not).
    """
    check_positive_int("checkpoint_every_n_steps", checkpoint_every_n_steps, minimum=0)
    callbacks: list[L.Callback] = [
        RunReport(),  # first: its epoch timer stops before the monitors' evaluation work
        KNNMonitor(knn_every_n_epochs, baseline_memory_mb),
        CollapseMonitor(dense_every_n_steps=dense_every_n_steps),
        NonFiniteGuard(on_nonfinite),
        DistributedRun(),
        DataPosition(),
        ModelCheckpoint(
            monitor="knn/top1",
            mode="max",
            every_n_epochs=knn_every_n_epochs,  # the epochs that measure it
            filename="best-knn-epoch={epoch}-top1={knn/top1:.4f}",
            auto_insert_metric_name=False,
        ),
        # last.ckpt has its own writer: Lightning 2.6's ``save_last=True`` on the monitored
        # checkpoint rewrites last.ckpt only in the epochs whose k-NN is a new best, which
        # left last.ckpt epochs behind the run (a resume restarted from there; diagnose read
        # an old model). No monitor: it writes at every epoch end, over the same file.
        ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
    ]
    if checkpoint_every_n_steps:
        # A second writer of last.ckpt, on steps (Lightning's step and epoch triggers are
        # mutually exclusive within one ModelCheckpoint).
        callbacks.append(
            ModelCheckpoint(
                save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every_n_steps
            )
        )
    return callbacks


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """``plugins`` plus :class:`AtomicCheckpointIO`, unless they hold a CheckpointIO already."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def run_logger(run_dir: str | Path) -> RunCSVLogger:
    """``metrics.csv`` directly in ``run_dir`` (no ``version_N`` sub-folders), keeping the
    rows logged before a resume."""
    return RunCSVLogger(save_dir=str(run_dir), name="", version="")


def build_trainer(run_dir: str | Path, **trainer_kwargs: Any) -> L.Trainer:
    """A Trainer writing into ``run_dir`` with the standard callbacks, logger and atomic IO.

    The keywords of :func:`run_callbacks` go to it; every other keyword goes to
    :class:`lightning.Trainer`.
    """
    callbacks = run_callbacks(
        **{
            name: trainer_kwargs.pop(name)
            for name in inspect.signature(run_callbacks).parameters
            if name in trainer_kwargs
        }
    )
    trainer_kwargs.setdefault("log_every_n_steps", 1)
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    trainer_kwargs["plugins"] = with_atomic_checkpoints(trainer_kwargs.get("plugins"))
    banner = TrainingStartLines()
    with banner.holding():
        return L.Trainer(
            default_root_dir=str(run_dir),
            logger=run_logger(run_dir),
            callbacks=[*callbacks, *trainer_kwargs.pop("callbacks", []), banner],
            **trainer_kwargs,
        )


class TrainingStartLines(L.Callback):
    """Lightning's INFO lines of building the trainer ("GPU available: ...", "TPU available:
    ..."), held back and logged when training starts.

    An error found between building the trainer and the first step (a corrupt
    ``--ckpt_path``, an unreadable image, a run folder already in use) is then the only line
    on stderr; Lightning's tips about its cloud services are dropped.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold back the INFO lines Lightning logs meanwhile (warnings pass)."""
        _LIGHTNING_INFO.addFilter(self._hold)
        try:
            yield
        finally:
            _LIGHTNING_INFO.removeFilter(self._hold)

    def _hold(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        if not message.startswith("💡"):
            self._lines.append(message)
        return False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the held lines (once)."""
        for line in self._lines:
            _LIGHTNING_INFO.info(line)
        self._lines.clear()


#: The logger of Lightning's ``rank_zero_info`` lines (rank 0 only).
_LIGHTNING_INFO = logging.getLogger("lightning.pytorch.utilities.rank_zero")
