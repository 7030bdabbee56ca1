"""Training callbacks: online k-NN monitor, collapse monitor, run report.

Each callback only orchestrates: the science lives in the pure-PyTorch bricks
(:mod:`protogmm.evaluation`, :mod:`protogmm.diagnostics`).

Long-tailed training data (classes in at least two of the many / medium / few groups of
:meth:`protogmm.training.datamodule.SSLDataModule.frequency_groups`): the k-NN monitor also
measures the untrained encoder's and raw pixels' per-group accuracy at the start, and the
run report adds per-group k-NN and linear accuracy and per-group prototype diversity
(:mod:`protogmm.evaluation.longtail`). Every run writes ``class_counts.json`` and reports
the image files skipped as unreadable (``data.on_bad_image=skip``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from protogmm._checks import check_in_range, check_positive_int
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
from protogmm.evaluation import evaluate_long_tail, knn_accuracy, longtail_markdown
from protogmm.evaluation.features import extract_features

#: The ε sweep logged during training (paper Fig. 3a uses 0.025 ... 0.5).
TRAINING_EPS = (0.025, 0.1, 0.25, 0.5)


#: Linear-probe epochs of the per-group analysis (as ``protogmm eval linear``).
LONGTAIL_LINEAR_EPOCHS = 100

data_log = logging.getLogger("protogmm.data")
log = logging.getLogger("protogmm")


def eps_key(eps: float) -> str:
    """Metric name of the unique-prototype percentage at ``eps``."""
    return f"unique_pct/eps={eps:g}"


def long_tailed_data(datamodule: Any) -> bool:
    """Whether the run's data module splits its training classes into >= 2 frequency groups."""
    return datamodule is not None and bool(getattr(datamodule, "is_long_tailed", lambda: False)())


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) and no gradients, then the previous mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def teacher_long_tail(
    module: L.LightningModule,
    datamodule: Any,
    *,
    with_prototypes: bool = True,
    linear_epochs: int = LONGTAIL_LINEAR_EPOCHS,
) -> dict[str, Any]:
    """Per-group k-NN / linear accuracy of the teacher backbone and prototype diversity.

    A sample's prototype is the argmax of the teacher's cosine scores of its embedding
    (backbone, projection head, then the teacher's prototypes: the GMM means when
    decoupled), the assignment the training targets are built from. The diversity is left
    out when ``with_prototypes`` is False or a mixture is not fitted yet.
    """
    train_loader, test_loader = datamodule.knn_dataloaders()
    assign = None
    if with_prototypes and module.prototypes_fitted():
        head, prototypes = module.teacher["head"], module.teacher_prototypes

        def assign(features: torch.Tensor) -> torch.Tensor:
            return prototypes(head(features)).argmax(dim=1)

    with evaluating(module):
        return evaluate_long_tail(
            datamodule.frequency_groups(),
            train_loader,
            test_loader,
            module.teacher["backbone"],
            assign=assign,
            device=module.device,
            linear_epochs=linear_epochs,
        )


def pixels_long_tail(
    datamodule: Any, linear_epochs: int = LONGTAIL_LINEAR_EPOCHS
) -> dict[str, Any]:
    """Per-group k-NN / linear accuracy of raw pixels (the baseline every number stands by)."""
    train_loader, test_loader = datamodule.knn_dataloaders()
    return evaluate_long_tail(
        datamodule.frequency_groups(),
        train_loader,
        test_loader,
        None,
        linear_epochs=linear_epochs,
    )


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
        # Under DDP rank 0 measures (its model is the one the checkpoints hold; the others'
        # BatchNorm statistics differ) over the whole bank, and every rank receives its
        # numbers, so all ranks log the same accuracy and agree on the best checkpoint.
        accuracy = None
        if trainer.is_global_zero:
            train_loader, test_loader = trainer.datamodule.knn_dataloaders()
            device = trainer.lightning_module.device
            train_x, train_y = extract_features(encoder, train_loader, device)
            test_x, test_y = extract_features(encoder, test_loader, device)
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
                "over the %.3g MB budget (lower data.knn_train_samples / knn_test_samples)",
                name,
                rows,
                width,
                needed_mb,
                self.baseline_memory_mb,
            )
        return False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baselines or trainer.global_step > 0:
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
        for logger in trainer.loggers:
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class RunReport(L.Callback):
    """Times epochs and, at the end of fit, writes ``summary.json``, plots and ``report.md``."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))

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
        knn = next((c for c in trainer.callbacks if isinstance(c, KNNMonitor)), None)
        collapse = next((c for c in trainer.callbacks if isinstance(c, CollapseMonitor)), None)
        hp = pl_module.hparams
        summary: dict[str, Any] = {
            "prototypes": hp.prototypes,
            "targets": hp.targets if hp.prototypes == "decoupled" else None,
            "backbone": hp.backbone,
            "num_prototypes": hp.num_prototypes,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seconds_per_epoch": (
                sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
            ),
            "peak_memory_mb": peak_memory_mb(pl_module.device),
        }
        mixture = getattr(pl_module, "gmm", None)
        if mixture is not None:
            # Every mixture setting as resolved, defaults included: hparams.yaml holds only
            # what the user passed, so it cannot tell runs before and after a default changed.
            summary["gmm"] = mixture.settings()
        if knn is not None:
            summary.update(knn.baselines)
            if knn.history:
                summary["knn/top1"] = knn.history[-1]["top1"]
                summary["knn/top1_k200"] = knn.history[-1]["top1_k200"]
        plots = []
        if collapse is not None and collapse.history:
            summary["unique_pct"] = {
                f"{eps:g}": collapse.history[-1][eps_key(eps)] for eps in collapse.eps_values
            }
            plot_collapse_over_training(
                {hp.prototypes: collapse.history},
                collapse.eps_values,
                run_dir / "collapse_over_training.png",
            )
            plots.append(("unique prototypes over training", "collapse_over_training.png"))
        if pl_module.prototypes_fitted():
            prototypes = pl_module.prototype_vectors().cpu()
            label = f"{hp.prototypes} (final)"
            curve = unique_prototype_curve(prototypes, DEFAULT_EPS)
            summary["angle_flatness"] = angle_flatness(prototype_angles(prototypes))
            plot_unique_vs_eps(
                {label: curve}, {label: hp.num_prototypes}, run_dir / "unique_vs_eps.png"
            )
            plot_prototype_geometry({label: prototypes}, run_dir / "prototype_geometry.png")
            plots += [
                ("unique prototypes against ε", "unique_vs_eps.png"),
                ("prototype geometry", "prototype_geometry.png"),
            ]
        sections = []
        if skipped:
            summary["skipped_images"] = {
                "count": sum(len(paths) for paths in skipped.values()),
                "by_split": {split: len(paths) for split, paths in skipped.items()},
                "files": {
                    split: [display_path(path) for path in paths[:MAX_LISTED_FILES]]
                    for split, paths in skipped.items()
                },
            }
            data_log.warning(
                "%d unreadable image file(s) were skipped (data.on_bad_image=skip); listed in %s",
                summary["skipped_images"]["count"],
                run_dir / "summary.json",
            )
        if long_tailed_data(trainer.datamodule):
            groups = trainer.datamodule.frequency_groups()
            results = {"trained": teacher_long_tail(pl_module, trainer.datamodule)}
            if knn is not None:
                results.update(knn.longtail_baselines)
            summary["longtail"] = {**groups.as_dict(), "results": results}
            sections.append(
                "## Long tail: head / medium / tail\n\n"
                + longtail_markdown(groups, results, num_prototypes=hp.num_prototypes)
            )
        write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        write_text_atomically(run_dir / "report.md", render_report(summary, plots, sections))


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


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: never half a file.

    UTF-8, with any lone surrogate (a file name that is not UTF-8) written as a ``\\udcff``
    escape rather than failing; the temporary file is removed if anything fails.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def render_report(
    summary: dict[str, Any], plots: list[tuple[str, str]], sections: list[str] | None = None
) -> str:
    """A short Markdown report of one run (what the demo and ``report.md`` show).

    ``sections`` (ready Markdown, e.g. the long-tail tables) go before the plots.
    """

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"# protogmm run: {summary['prototypes']} prototypes",
        "",
        f"- backbone `{summary['backbone']}`, K = {summary['num_prototypes']}, "
        f"{summary['epochs']} epochs, {summary['steps']} steps",
        f"- seconds per epoch: {summary['seconds_per_epoch']:.1f}"
        if summary.get("seconds_per_epoch")
        else "- seconds per epoch: n/a",
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
            f"Unreadable image files skipped (data.on_bad_image=skip): {skipped['count']} "
            f"({by_split}), e.g. `{first}`; the list is in summary.json.",
            "",
        ]
    for section in sections or []:
        lines += [section, ""]
    for title, filename in plots:
        lines += [f"![{title}]({filename})", ""]
    return "\n".join(lines)
