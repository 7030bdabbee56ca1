"""The online k-NN monitor: the teacher backbone's k-NN top-1 every epoch, beside its baselines.

On long-tailed data it also measures the untrained encoder's and raw pixels' per-group
accuracy at the start (:mod:`protogmm.training.longtail_eval`), for the run report.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from protogmm._checks import check_in_range, check_positive_int
from protogmm.evaluation import knn_accuracy
from protogmm.evaluation.features import extract_features_sharded
from protogmm.training.longtail_eval import long_tailed_data, pixels_long_tail, teacher_long_tail

log = logging.getLogger("protogmm")


class KNNMonitor(L.Callback):
    """k-NN top-1 of the teacher backbone on the held-out split, every epoch.

    Reports DINO's protocol (k=20, T=0.07) as ``knn/top1`` and lightly's (k=200, T=0.1) as
    ``knn/top1_k200``. At the start of a fresh run it also measures the two baselines every
    accuracy must stand beside (design.md §9): the untrained encoder (``knn/untrained``)
    and raw pixels (``knn/pixels``).
    """

    def __init__(self, every_n_epochs: int = 1, baseline_memory_mb: float = 2048.0) -> None:
        check_positive_int("knn_every_n_epochs", every_n_epochs)
        check_in_range("baseline_memory_mb", baseline_memory_mb, 0.0, math.inf)
        self.every_n_epochs = every_n_epochs
        self.baseline_memory_mb = baseline_memory_mb
        self.baselines: dict[str, float] = {}
        self.longtail_baselines: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, float]] = []

    def _accuracy(self, trainer: L.Trainer, encoder: torch.nn.Module | None) -> dict[str, float]:
        # Under DDP every rank extracts its shard of the bank and the shards are gathered
        # (extract_features_sharded); the model is rank 0's, the one the checkpoints hold:
        # its BatchNorm statistics are broadcast into a copy, since each rank's differ. Rank 0
        # classifies, and every rank receives its numbers, so all ranks log the same accuracy
        # and agree on the best checkpoint.
        train_loader, test_loader = trainer.datamodule.knn_dataloaders()
        device = trainer.lightning_module.device
        encoder = _with_rank_zero_buffers(encoder)
        train_x, train_y = extract_features_sharded(encoder, train_loader, device)
        test_x, test_y = extract_features_sharded(encoder, test_loader, device)
        accuracy = None
        if trainer.is_global_zero:
            accuracy = {
                "k20": knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07),
                "k200": knn_accuracy(train_x, train_y, test_x, test_y, k=200, temperature=0.1),
            }
        return trainer.strategy.broadcast(accuracy, src=0)

    def _fits_budget(self, trainer: L.Trainer, name: str, width: int) -> bool:
        """Whether the bank's ``width``-wide float32 features fit ``baseline_memory_mb``;
        if not, one log line says the baseline ``name`` is skipped and why."""
        datamodule = trainer.datamodule
        rows = sum(map(len, datamodule.knn_splits())) if hasattr(datamodule, "knn_splits") else 0
        needed_mb = rows * width * 4 / 2**20
        if needed_mb <= self.baseline_memory_mb:
            return True
        if trainer.is_global_zero:
            log.warning(
                "protogmm: k-NN baseline '%s' skipped: %d images x %d features take %.3g MB, "
                "over the %.3g MB budget (lower data.knn.train_samples / data.knn.test_samples)",
                name,
                rows,
                width,
                needed_mb,
                self.baseline_memory_mb,
            )
        return False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not when resuming (the step counter is restored only after this hook, so it reads 0):
        # the encoder holds trained weights by now, and the baselines of the run's start
        # were restored with this callback's state (none, if they did not fit the budget).
        if self.baselines or trainer.global_step > 0 or trainer.ckpt_path is not None:
            return
        encoder = pl_module.teacher["backbone"]
        datamodule = trainer.datamodule
        pixels = getattr(datamodule, "in_channels", 0) * getattr(datamodule, "image_size", 0) ** 2
        measured: dict[str, Any] = {}
        if self._fits_budget(trainer, "untrained", getattr(encoder, "feature_dim", 0)):
            measured["untrained"] = self._accuracy(trainer, encoder)
        if self._fits_budget(trainer, "pixels", pixels):
            measured["pixels"] = self._accuracy(trainer, None)
        self.baselines = {
            f"knn/{name}{suffix}": accuracy[key]
            for name, accuracy in measured.items()
            for suffix, key in (("", "k20"), ("_k200", "k200"))
        }
        for logger in trainer.loggers if self.baselines else ():  # an empty row says nothing
            logger.log_metrics(self.baselines, step=0)
        if trainer.is_global_zero and long_tailed_data(datamodule):
            # Per-group baselines for the run report (rank 0 writes it), measured before
            # the first step like the overall ones.
            if "untrained" in measured:
                self.longtail_baselines["untrained encoder"] = teacher_long_tail(
                    pl_module, datamodule, with_prototypes=False
                )
            if "pixels" in measured:
                self.longtail_baselines["raw pixels"] = pixels_long_tail(datamodule)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        accuracy = self._accuracy(trainer, pl_module.teacher["backbone"])
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "top1": accuracy["k20"],
                "top1_k200": accuracy["k200"],
            }
        )
        # Every rank holds rank 0's numbers: their mean over ranks is that number (and
        # saying so silences Lightning's per-epoch sync_dist warning under DDP).
        pl_module.log_dict(
            {"knn/top1": accuracy["k20"], "knn/top1_k200": accuracy["k200"]},
            on_epoch=True,
            prog_bar=False,
            sync_dist=True,
        )
        pl_module.log("knn", accuracy["k20"], prog_bar=True, logger=False, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "baselines": self.baselines,
            "history": self.history,
            "longtail_baselines": self.longtail_baselines,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baselines = dict(state_dict.get("baselines", {}))
        self.history = list(state_dict.get("history", []))
        self.longtail_baselines = dict(state_dict.get("longtail_baselines", {}))


def _with_rank_zero_buffers(encoder: torch.nn.Module | None) -> torch.nn.Module | None:
    """Under a process group, a copy of ``encoder`` holding rank 0's buffers (BatchNorm
    statistics are per rank under DDP); else ``encoder`` itself."""
    if encoder is None or not (dist.is_available() and dist.is_initialized()):
        return encoder
    if dist.get_world_size() == 1 or not any(True for _ in encoder.buffers()):
        return encoder
    twin = copy.deepcopy(encoder)
    for buffer in twin.buffers():
        dist.broadcast(buffer, src=0)
    return twin
