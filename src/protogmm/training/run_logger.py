"""``metrics.csv`` that survives a resume: Lightning's CSV logger, keeping the run's history.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a run resumed
after a crash (or kill -9) kept only the steps after its checkpoint. This writer reads the
existing rows instead, and at its first save writes them back (atomically: temporary file,
then rename) followed by the new rows, dropping the old rows from the first new step on:
those were logged after the checkpoint the run resumed from, and the resumed run logs them
again. At the first new step itself (the checkpoint's step) an old row is dropped only if
the resumed run logs one of its metrics there again: a measurement taken at that step
before the checkpoint was written (the collapse monitor's, at the end of a run stopped by
``max_steps``) is not repeated by the resumed run, and is kept. A fresh run into the same
folder starts at step 0, so it replaces all the old rows, as before.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class HistoryKeepingWriter(ExperimentWriter):
    """Lightning's ``ExperimentWriter`` that keeps the rows already in ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        # Instead of deleting the file: remember its rows (written back at the first save).
        self._previous_rows: list[dict[str, Any]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self._previous_rows = list(csv.DictReader(handle))

    def save(self) -> None:
        if self._previous_rows is None or not self.metrics:
            super().save()
            return
        # A row with nothing but its step says nothing, and must not decide what is dropped.
        logged = [row for row in self.metrics if _metric_names(row)] or self.metrics
        first_new_step = min(float(row["step"]) for row in logged)
        logged_again = set().union(
            *(_metric_names(row) for row in logged if float(row["step"]) == first_new_step)
        )
        resumed = first_new_step > 0  # a fresh run (step 0) replaces every old row
        kept = [
            row
            for row in self._previous_rows
            if row.get("step") not in (None, "")
            and (
                float(row["step"]) < first_new_step
                or (
                    resumed
                    and float(row["step"]) == first_new_step
                    and not _metric_names(row) & logged_again
                )
            )
        ]
        rows = kept + self.metrics
        self.metrics_keys = sorted(set().union(*rows))
        temporary = self.metrics_file_path + ".tmp"
        with self._fs.open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.metrics_file_path)
        self._previous_rows = None
        self.metrics = []


def _metric_names(row: dict[str, Any]) -> set[str]:
    """The metrics a ``metrics.csv`` row holds a value of (not its step or epoch)."""
    return {key for key, value in row.items() if value not in (None, "")} - {"step", "epoch"}


#: TensorBoard's event files, written directly in the run folder (so ``tensorboard --logdir
#: runs`` shows every run under its folder's name).
TENSORBOARD_EVENTS = "events.out.tfevents.*"


def run_loggers(run_dir: str, kind: str = "csv") -> list[dict[str, Any]]:
    """The run's loggers as LightningCLI class specs: ``metrics.csv`` directly in ``run_dir``
    (``csv``), TensorBoard event files beside it (``tensorboard``; a resumed run adds a new
    event file), or ``both``. Either way the run folder itself is ``run_dir``."""
    csv_logger = {
        "class_path": "protogmm.training.run_logger.RunCSVLogger",
        "init_args": {"save_dir": run_dir, "name": "", "version": ""},
    }
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": run_dir,
            "name": "",
            "version": "",
            "default_hp_metric": False,
        },
    }
    return {"csv": [csv_logger], "tensorboard": [tensorboard], "both": [csv_logger, tensorboard]}[
        kind
    ]


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the rows of the run before a resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment
