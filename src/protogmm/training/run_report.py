"""The run report: ``class_counts.json`` before the first step, then at the end of fit
``summary.json``, the plots and ``report.md``.

The report gathers what the monitors measured (:mod:`protogmm.training.knn_monitor`,
:mod:`protogmm.training.collapse_monitor`), the final prototypes' geometry, the per-group
results on long-tailed data (:mod:`protogmm.training.longtail_eval`) and the image files
skipped as unreadable (``data.images.on_bad=skip``).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from protogmm.data.bad_images import display_path
from protogmm.diagnostics import (
    DEFAULT_EPS,
    angle_flatness,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
    unique_prototype_curve,
)
from protogmm.diagnostics.plots import plot_collapse_over_training
from protogmm.evaluation import longtail_markdown
from protogmm.training.atomic_io import write_text_atomically
from protogmm.training.collapse_monitor import CollapseMonitor, eps_key
from protogmm.training.data_position import is_mid_epoch, loader_position
from protogmm.training.knn_monitor import KNNMonitor
from protogmm.training.longtail_eval import long_tailed_data, teacher_long_tail
from protogmm.training.resume_check import SCHEDULE_KEY, schedule_record

data_log = logging.getLogger("protogmm.data")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class EpochTimer:
    """Seconds of each epoch, across a resume: what ``seconds_per_epoch`` averages.

    An epoch is timed from its first batch to its last. An epoch a run resumes in its middle
    adds the seconds after the resume to those before the checkpoint (saved in it), not the
    time in between: the seconds its batches took. Whole epochs (every batch ran, and was
    timed) are averaged. An epoch cut short (``max_steps`` in its middle) or resumed from a
    checkpoint that holds no seconds for its earlier batches (written before they were
    saved) is partial: it counts only when no epoch ran whole (a run shorter than one
    epoch), and :meth:`note` then says what the number covers.
    """

    def __init__(self) -> None:
        self.whole: list[float] = []
        #: The epoch being timed: its number, seconds before the running stretch, batches
        #: seen (the epoch's own batch index, restored on resume) and whether all were timed.
        self.current: dict[str, Any] | None = None
        #: The last partial epoch (as :attr:`current`, with ``of``: its batches in all).
        self.partial: dict[str, Any] | None = None
        self._since: float | None = None  # when the running stretch began (None: stopped)

    def start_epoch(self, epoch: int) -> None:
        """A new epoch: timed from now."""
        self.current = {"epoch": epoch, "seconds": 0.0, "batches": 0, "from_start": True}
        self._since = time.perf_counter()

    def start_run(self, epoch: int) -> None:
        """A fit starts (fresh or resumed): the epoch in progress, if any, goes on from now.

        Lightning calls no ``on_train_epoch_start`` for an epoch resumed in its middle (nor,
        under ``max_steps``, for the first epoch after an end-of-epoch checkpoint): without
        this, that epoch had no start time at all.
        """
        if self.current is None:
            self.current = {"epoch": epoch, "seconds": 0.0, "batches": 0, "from_start": True}
        self._since = time.perf_counter()

    def batch_done(self, batch_idx: int) -> None:
        """Counts the epoch's batches; a gap (batches before a resume, untimed) makes it partial."""
        if self.current is None:
            return
        if batch_idx != self.current["batches"]:
            self.current["from_start"] = False
        self.current["batches"] = batch_idx + 1

    def end_epoch(self, epoch: int, last_batch: bool, batches_per_epoch: float) -> None:
        """The epoch ends: whole, partial, or (``max_steps`` in its middle) to be resumed."""
        if self.current is None or self._since is None:
            return
        record = dict(self.current, epoch=epoch, seconds=self.seconds())
        self._since = None
        if last_batch and record["from_start"]:
            self.whole.append(record["seconds"])
        else:
            of = int(batches_per_epoch) if math.isfinite(batches_per_epoch) else None
            self.partial = dict(record, of=of)
        # Cut short, the epoch stays open: a run resumed from here goes on timing it.
        self.current = None if last_batch else record

    def seconds(self) -> float:
        """Seconds of the current epoch so far (0 if none)."""
        if self.current is None:
            return 0.0
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.current["seconds"] + running

    def seconds_per_epoch(self) -> float | None:
        """The mean over whole epochs; with none, the last partial epoch's seconds."""
        if self.whole:
            return sum(self.whole) / len(self.whole)
        return self.partial["seconds"] if self.partial else None

    def note(self) -> str | None:
        """What :meth:`seconds_per_epoch` covers when it is not a mean of whole epochs."""
        if self.whole or not self.partial:
            return None
        epoch, batches, of = (self.partial[key] for key in ("epoch", "batches", "of"))
        if not self.partial["from_start"]:
            return (
                f"epoch {epoch}: only its batches after the resume were timed (the "
                "checkpoint holds no time for those before)"
            )
        return f"epoch {epoch} ran {batches} of {of or '?'} batches, no epoch ran whole"

    def state_dict(self) -> dict[str, Any]:
        """Plain values (``weights_only=True`` reads them); the running epoch's seconds so far."""
        current = None if self.current is None else dict(self.current, seconds=self.seconds())
        return {"epoch_seconds": self.whole, "epoch_in_progress": current, "partial": self.partial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Either layout: a checkpoint of before :attr:`current` holds whole epochs only."""
        self.whole = list(state.get("epoch_seconds", []))
        self.current = state.get("epoch_in_progress")
        self.partial = state.get("partial")
        self._since = None


class RunReport(L.Callback):
    """Times epochs and, at the end of fit, writes ``summary.json``, plots and ``report.md``.

    ``seconds_per_epoch`` is :class:`EpochTimer`'s: whole epochs, each timed across a
    resume; a partial epoch only when none ran whole (``seconds_per_epoch_note`` says so).
    Every checkpoint also gets the schedules' horizon and the trainer settings behind it
    (:func:`~protogmm.training.resume_check.schedule_record`), which a resume compares.
    """

    def __init__(self) -> None:
        self.timer = EpochTimer()
        self._legacy_resume: tuple[int, bool] | None = None  # (epoch, mid-epoch) of an old state

    @property
    def epoch_seconds(self) -> list[float]:
        """Seconds of each whole epoch."""
        return self.timer.whole

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._legacy_resume is not None:
            epoch, mid_epoch = self._legacy_resume
            if mid_epoch:  # its times beyond the whole epochs: the stopped epoch's first part
                del self.timer.whole[epoch:]
            self._legacy_resume = None
        self.timer.start_run(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.start_epoch(trainer.current_epoch)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.timer.batch_done(batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self.timer.end_epoch(trainer.current_epoch, last_batch, trainer.num_training_batches)

    def state_dict(self) -> dict[str, Any]:
        return self.timer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.timer.load_state_dict(state_dict)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[SCHEDULE_KEY] = schedule_record(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Before this callback's state is loaded, and before DataPosition takes the loader's
        # position out of the checkpoint (this callback comes first). A state of before the
        # epoch in progress was saved counted an epoch cut short by max_steps as whole.
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if "epoch_in_progress" not in state:
            position = loader_position(checkpoint)
            mid_epoch = position is not None and is_mid_epoch(position)
            self._legacy_resume = (int(checkpoint.get("epoch", 0)), mid_epoch)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The per-class counts of the training split, written before the first step so a
        # run stopped early still says what it trained on.
        record = getattr(trainer.datamodule, "class_counts_record", None)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero and record is not None:
            run_dir = Path(log_dir or trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(run_dir / "class_counts.json", json.dumps(record(), indent=2))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = skipped_images(trainer, pl_module)  # collective under DDP: every rank
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        run_dir = Path(log_dir or trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        knn = _first_callback(trainer, KNNMonitor)
        collapse = _first_callback(trainer, CollapseMonitor)
        # The summary's keys keep this order (settings, k-NN, collapse, prototypes, skipped
        # files, long tail): summary.json is read by people as well as by compare / reports.
        summary = self._run_settings(trainer, pl_module)
        if knn is not None:
            summary.update(_knn_summary(knn))
        plots: list[tuple[str, str]] = []
        if collapse is not None and collapse.history:
            summary["unique_pct"], collapse_plots = _collapse_over_training(
                collapse, pl_module.kind.name, run_dir
            )
            plots += collapse_plots
        if pl_module.prototypes_fitted():
            summary["angle_flatness"], prototype_plots = _final_prototypes(pl_module, run_dir)
            plots += prototype_plots
        sections = []
        if skipped:
            summary["skipped_images"] = _skipped_summary(skipped, run_dir)
        if long_tailed_data(trainer.datamodule):
            summary["longtail"], section = _long_tail_summary(trainer, pl_module, knn)
            sections.append(section)
        write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        write_text_atomically(run_dir / "report.md", render_report(summary, plots, sections))

    def _run_settings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What ran and what it cost: the method, K, steps, time per epoch, peak memory."""
        hp = pl_module.hparams
        summary: dict[str, Any] = {
            "host": pl_module.host.name,
            "prototypes": pl_module.kind.name,
            "targets": getattr(pl_module.kind, "targets", None),
            "backbone": hp.backbone,
            "num_prototypes": hp.num_prototypes,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seconds_per_epoch": self.timer.seconds_per_epoch(),
            "peak_memory_mb": peak_memory_mb(pl_module.device),
        }
        if self.timer.note():
            summary["seconds_per_epoch_note"] = self.timer.note()
        mixture = getattr(pl_module, "gmm", None)
        if mixture is not None:
            # Every mixture setting as resolved, defaults included: hparams.yaml holds only
            # what the user passed, so it cannot tell runs before and after a default changed.
            summary["gmm"] = mixture.settings()
        return summary


_CallbackT = TypeVar("_CallbackT", bound=L.Callback)


def _first_callback(trainer: L.Trainer, kind: type[_CallbackT]) -> _CallbackT | None:
    """The trainer's first callback of type ``kind`` (None: the run has none)."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _knn_summary(knn: KNNMonitor) -> dict[str, float]:
    """The k-NN baselines and the last epoch's k-NN top-1 (k=20 and k=200)."""
    summary = dict(knn.baselines)
    if knn.history:
        summary["knn/top1"] = knn.history[-1]["top1"]
        summary["knn/top1_k200"] = knn.history[-1]["top1_k200"]
    return summary


def _collapse_over_training(
    collapse: CollapseMonitor, prototypes: str, run_dir: Path
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """The last measured unique-prototype percentages by ε, and their plot over training."""
    unique_pct = {f"{eps:g}": collapse.history[-1][eps_key(eps)] for eps in collapse.eps_values}
    plot_collapse_over_training(
        {prototypes: collapse.history},
        collapse.eps_values,
        run_dir / "collapse_over_training.png",
    )
    return unique_pct, [("unique prototypes over training", "collapse_over_training.png")]


def _final_prototypes(
    pl_module: L.LightningModule, run_dir: Path
) -> tuple[float, list[tuple[str, str]]]:
    """The final prototypes' angle flatness, and the plots of their uniqueness and geometry."""
    hp = pl_module.hparams
    prototypes = pl_module.prototype_vectors().cpu()
    label = f"{pl_module.kind.name} (final)"
    curve = unique_prototype_curve(prototypes, DEFAULT_EPS)
    flatness = angle_flatness(prototype_angles(prototypes))
    plot_unique_vs_eps({label: curve}, {label: hp.num_prototypes}, run_dir / "unique_vs_eps.png")
    plot_prototype_geometry({label: prototypes}, run_dir / "prototype_geometry.png")
    return flatness, [
        ("unique prototypes against ε", "unique_vs_eps.png"),
        ("prototype geometry", "prototype_geometry.png"),
    ]


def _skipped_summary(skipped: dict[str, list[str]], run_dir: Path) -> dict[str, Any]:
    """The unreadable files skipped (count, by split, the first of each listed), logged once."""
    record = {
        "count": sum(len(paths) for paths in skipped.values()),
        "by_split": {split: len(paths) for split, paths in skipped.items()},
        "files": {
            split: [display_path(path) for path in paths[:MAX_LISTED_FILES]]
            for split, paths in skipped.items()
        },
    }
    data_log.warning(
        "%d unreadable image file(s) were skipped (data.images.on_bad=skip); listed in %s",
        record["count"],
        run_dir / "summary.json",
    )
    return record


def _long_tail_summary(
    trainer: L.Trainer, pl_module: L.LightningModule, knn: KNNMonitor | None
) -> tuple[dict[str, Any], str]:
    """The trained teacher's per-group results beside the monitor's baselines, and the
    report's Markdown section of them."""
    groups = trainer.datamodule.frequency_groups()
    results = {"trained": teacher_long_tail(pl_module, trainer.datamodule)}
    if knn is not None:
        results.update(knn.longtail_baselines)
    section = "## Long tail: head / medium / tail\n\n" + longtail_markdown(
        groups, results, num_prototypes=pl_module.hparams.num_prototypes
    )
    return {**groups.as_dict(), "results": results}, section


#: Skipped files listed per split in ``summary.json`` (the count covers all of them).
MAX_LISTED_FILES = 100


def skipped_images(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[str]]:
    """Unreadable files skipped during the run, by split, gathered over all DDP ranks.

    Each rank flags the files its own shard touched; the flags are summed across ranks
    (a collective: call it on every rank) before the paths are listed.
    """
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "skipped_images"):
        return {}
    for split, flags in sorted(datamodule.skip_flags().items()):
        total = trainer.strategy.reduce(flags.to(pl_module.device, torch.float32), reduce_op="sum")
        datamodule.mark_skipped(split, total.cpu() > 0)
    return datamodule.skipped_images()


def _count(number: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0 steps``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def render_report(
    summary: dict[str, Any], plots: list[tuple[str, str]], sections: list[str] | None = None
) -> str:
    """A short Markdown report of one run (what the demo and ``report.md`` show).

    ``sections`` (ready Markdown, e.g. the long-tail tables) go before the plots.
    """

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    seconds = summary.get("seconds_per_epoch")
    seconds_per_epoch = "n/a" if seconds is None else f"{seconds:.1f}"
    if seconds is not None and summary.get("seconds_per_epoch_note"):
        seconds_per_epoch += f" ({summary['seconds_per_epoch_note']})"

    lines = [
        f"# protogmm run: {summary['prototypes']} prototypes",
        "",
        f"- backbone `{summary['backbone']}`, K = {summary['num_prototypes']}, "
        f"{_count(summary['epochs'], 'epoch')}, {_count(summary['steps'], 'step')}",
        f"- seconds per epoch: {seconds_per_epoch}",
        f"- peak memory: {summary['peak_memory_mb']:.0f} MB",
        "",
        "| k-NN top-1 (k=20, T=0.07) | trained | untrained encoder | raw pixels |",
        "|---|---|---|---|",
        f"| held-out split | {pct(summary.get('knn/top1'))} | "
        f"{pct(summary.get('knn/untrained'))} | {pct(summary.get('knn/pixels'))} |",
        "",
    ]
    if "unique_pct" in summary:
        eps_values = list(summary["unique_pct"])
        lines += [
            "| unique prototypes (Def. 2.1) | " + " | ".join(f"ε={e}" for e in eps_values) + " |",
            "|---|" + "---|" * len(eps_values),
            "| % of K at the end | "
            + " | ".join(f"{summary['unique_pct'][e]:.1f}" for e in eps_values)
            + " |",
            "",
        ]
    if "angle_flatness" in summary:
        lines += [
            f"Angle density of the PCA-2 projection: total variation to uniform "
            f"{summary['angle_flatness']:.2f} (0 = flat, as the paper's decoupled "
            "prototypes; near 1 = all at one angle).",
            "",
        ]
    if "skipped_images" in summary:
        skipped = summary["skipped_images"]
        first = next(iter(skipped["files"].values()))[0]
        by_split = ", ".join(f"{split}: {n}" for split, n in skipped["by_split"].items())
        lines += [
            f"Unreadable image files skipped (data.images.on_bad=skip): {skipped['count']} "
            f"({by_split}), e.g. `{first}`; the list is in summary.json.",
            "",
        ]
    for section in sections or []:
        lines += [section, ""]
    for title, filename in plots:
        lines += [f"![{title}]({filename})", ""]
    return "\n".join(lines)
