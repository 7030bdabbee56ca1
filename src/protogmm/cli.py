"""The ``protogmm`` command.

``protogmm fit --config FILE [--section.key value ...]``
    Pretrain with LightningCLI (YAML configs, dotted overrides, ``--ckpt_path`` to resume);
    multi-process with ``--trainer.devices N --trainer.strategy ddp`` or under ``torchrun``.
``protogmm demo [--quick] [--host dino|ibot|carp]``
    Joint vs decoupled prototypes of one host side by side on the embedded data: one table
    and one plot.
``protogmm diagnose CKPT [--eps ...] [--out DIR] [--data NAME|checkpoint [--data-root DIR]]``
    Unique prototypes (Definition 2.1) over an ε sweep, usage, geometry plots; also for
    DINO / iBOT / DINOv2 checkpoints.
``protogmm eval knn|linear CKPT --data NAME``
    Frozen-encoder k-NN or linear probe, beside the untrained encoder and raw pixels.
``protogmm compare RUN_DIR...``
    One table and overlaid collapse-over-training plots across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from protogmm.diagnostics import (
    DEFAULT_EPS,
    UsageAccumulator,
    angle_flatness,
    describe_prototypes,
    load_prototypes,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
    unique_prototype_curve,
)
from protogmm.diagnostics.plots import plot_collapse_over_training
from protogmm.evaluation import knn_accuracy, linear_probe
from protogmm.evaluation.features import extract_features
from protogmm.evaluation.longtail import longtail_markdown
from protogmm.reports import markdown_table
from protogmm.training.callbacks import (
    TRAINING_EPS,
    pixels_long_tail,
    teacher_long_tail,
    write_text_atomically,
)
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import DATASETS as DATA_MODULE_DATASETS
from protogmm.training.datamodule import SSLDataModule, datamodule_from_checkpoint
from protogmm.training.distributed import check_launch
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import NonFiniteError, check_resume_compatible
from protogmm.training.run_folder import claim_run_folder, resolve_checkpoint
from protogmm.training.runner import build_trainer, run_callbacks, with_atomic_checkpoints

DATASETS = ("mnist5k", "synthetic")

CONFIG_DIR = Path(__file__).parent / "configs"


class ProtoCLI(LightningCLI):
    """LightningCLI with the data's image geometry linked into the model and our run layout."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],  # noqa: UP045 (jsonargparse needs a typing object)
            default=None,
            help="checkpoint to resume from (e.g. RUN/checkpoints/last.ckpt)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="replace the run the folder holds (its files are removed first); without it "
            "a fit into a folder holding another run is refused",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=0,
            help="also write last.ckpt every N steps (0: at epoch ends only); resumes exactly",
        )
        parser.add_argument(
            "--on_nonfinite",
            type=Literal["stop", "skip"],
            default="stop",
            help="a non-finite input batch or loss stops the run (default) or skips the step",
        )

    def before_instantiate_classes(self) -> None:
        trainer = self.config.trainer
        # Under torchrun the process layout must match the launcher's (one line if not).
        trainer.devices = check_launch(trainer.devices, trainer.num_nodes, trainer.accelerator)
        if trainer.logger in (None, True):
            # metrics.csv directly in the run directory (see training/runner.py)
            run_dir = trainer.default_root_dir or "runs/default"
            trainer.default_root_dir = run_dir
            trainer.logger = {
                "class_path": "protogmm.training.run_logger.RunCSVLogger",
                "init_args": {"save_dir": run_dir, "name": "", "version": ""},
            }

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # The run's callbacks depend on two fit options; checkpoints are written atomically.
        self.trainer_defaults["callbacks"] = run_callbacks(
            checkpoint_every_n_steps=self.config.checkpoint_every_n_steps,
            on_nonfinite=self.config.on_nonfinite,
        )
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        kwargs["plugins"] = with_atomic_checkpoints(plugins)
        return super().instantiate_trainer(**kwargs)


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Silence a logger's INFO lines (e.g. "Seed set to 0") while the CLI builds the run."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class ConfigError(ValueError):
    """A bad command line or configuration, reported as one line before training starts."""


def _one_line(text: str) -> str:
    """The parser's error message (after its usage text) folded onto one line."""
    message = text[text.rfind("error:") + len("error:") :] if "error:" in text else text
    return " ".join(message.split())[:500]


def _check_config_files(args: list[str]) -> None:
    """An empty ``--config`` file is one line naming it (jsonargparse says "Unexpected config:")."""
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            path = Path(args[index + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            content = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            continue  # the parser reports syntax errors with their position
        if content is None:
            raise ConfigError(f"--config {path}: the file is empty (no keys to set)")


def run_fit(args: list[str]) -> int:
    """``protogmm fit``: parse and build with LightningCLI, then fit (resuming if asked).

    Returns 0, or 3 when the non-finite guard stopped the run (its message on stderr).
    """
    _check_config_files(args)
    captured = io.StringIO()
    try:
        # Parsing and building print argparse's usage on error; keep only its message.
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
        with contextlib.redirect_stderr(captured), _quiet(seed_logger):
            cli = ProtoCLI(
                PrototypicalSSL,
                SSLDataModule,
                args=args,
                run=False,
                trainer_defaults={
                    "callbacks": [],  # set from the fit options in ProtoCLI.instantiate_trainer
                    "default_root_dir": "runs/default",
                    "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0,
                },
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                parser_kwargs={"default_config_files": [str(CONFIG_DIR / "default.yaml")]},
            )
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help / --print_config
            sys.stdout.write(captured.getvalue())
            return 0
        raise ConfigError(_one_line(captured.getvalue())) from None
    except MisconfigurationException as error:  # e.g. more GPUs asked for than present
        raise ConfigError(" ".join(str(error).split())) from None
    run_dir = Path(cli.trainer.default_root_dir)
    ckpt_path = resolve_checkpoint(cli.config.ckpt_path, run_dir)
    if ckpt_path is not None and ckpt_path not in ("hpc", "registry"):
        # Before any process starts or any step runs: a checkpoint of another configuration
        # or process layout is a one-line error; other differences are one warning line.
        notes = check_resume_compatible(
            ckpt_path, cli.model.hparams, cli.datamodule.hparams, cli.trainer.world_size
        )
        if notes and rank_zero_only.rank == 0:
            print(
                "protogmm fit: resuming with changed settings, not an exact continuation: "
                + "; ".join(notes),
                file=sys.stderr,
            )
    lock = None
    if rank_zero_only.rank == 0:  # the other ranks write into the folder rank 0 claimed
        lock = claim_run_folder(run_dir, ckpt_path, overwrite=cli.config.overwrite)
    # Lightning's own launcher (--trainer.devices N without torchrun) starts the other ranks
    # by re-running this command line; main() shortened sys.argv, so give it back whole.
    sys.argv = [sys.argv[0], "fit", *args]
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except NonFiniteError as error:
        rank = f" (rank {cli.trainer.global_rank})" if cli.trainer.world_size > 1 else ""
        print(f"protogmm fit{rank}: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        if lock is not None:
            lock.release()
    return 0


def demo_settings(quick: bool) -> dict[str, Any]:
    """The demo's budget on 2 CPU cores: ~4 minutes per run, or ~40 s with ``--quick``."""
    if quick:
        # A smoke test of the whole path (both runs, monitors, report, plot): 16 steps of
        # 64 images each, not a result.
        data = {"max_train_samples": 512, "batch_size": 64, "num_local_crops": 2}
        return {"max_epochs": 2, "data": data}
    return {"max_epochs": 5, "data": {"num_local_crops": 2}}


#: What each host changes from PrototypicalSSL's defaults in ``protogmm demo``; the configs
#: ``<host>_{joint,decoupled}_mnist5k.yaml`` hold the same keys (a test keeps them in step).
#: iBOT needs patch tokens: a ViT sized for 28 px on 2 CPU cores (4 px patches, a 7 x 7 grid;
#: 96-d, 4 blocks, 3 heads: 0.45 M parameters, about the ConvNet's 0.52 M, and about as fast
#: per image). BN stays in the head (unlike iBOT's ViT recipe): without it the untrained
#: ViT's [CLS] embeddings have mean pairwise cosine 0.95 on MNIST-5k and a GMM fitted to them
#: starts 1.1 % unique at ε = 0.025; with it 0.22 and 99.9 % (BENCHMARKS.md, "Hosts").
HOST_PRESETS: dict[str, dict[str, Any]] = {
    "dino": {},
    "ibot": {
        "host": "ibot",
        "backbone": "vit",
        "backbone_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3},
    },
    "carp": {"host": "carp"},
}


def run_demo(argv: list[str]) -> int:
    """``protogmm demo``: joint vs decoupled prototypes of one host (DINO by default), same
    backbone, seed and budget."""
    parser = argparse.ArgumentParser(prog="protogmm demo", description=run_demo.__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke-test budget (~1 min)")
    parser.add_argument(
        "--host", choices=tuple(HOST_PRESETS), default="dino", help="host objective (default dino)"
    )
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a demo the output directory holds"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the epoch budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prototypes", type=int, default=1024)
    args = parser.parse_args(argv)
    settings = demo_settings(args.quick)
    epochs = args.epochs or settings["max_epochs"]
    out = Path(args.out)
    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    # Both folders claimed before the first run: a demo already there is refused (or, with
    # --overwrite, removed) now, not after the joint run has trained.
    locks = []
    try:
        for kind in ("joint", "decoupled"):
            locks.append(claim_run_folder(out / kind, None, overwrite=args.overwrite))
        for kind in ("joint", "decoupled"):
            summaries[kind], histories[kind] = _demo_run(args, settings, epochs, out / kind, kind)
    finally:
        for lock in locks:
            lock.release()
    plot = plot_collapse_over_training(histories, TRAINING_EPS, out / "collapse_over_training.png")
    table = demo_table(summaries)
    write_text_atomically(out / "demo.md", table + f"\n![collapse]({plot.name})\n")
    print("\n" + table)
    print(f"plot: {plot}\nruns: {out / 'joint'}, {out / 'decoupled'}")
    return 0


def _demo_run(
    args: argparse.Namespace, settings: dict[str, Any], epochs: int, run_dir: Path, kind: str
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """One of the demo's two runs: its summary (with the wall time) and collapse history."""
    print(f"\n=== {args.host}, {kind} prototypes: {epochs} epochs on MNIST-5k ===", flush=True)
    L.seed_everything(args.seed, verbose=False)
    data = SSLDataModule(dataset="mnist5k", seed=args.seed, **settings["data"])
    model = PrototypicalSSL(
        **HOST_PRESETS[args.host],
        prototypes=kind,
        num_prototypes=args.num_prototypes,
        in_channels=data.in_channels,
        image_size=data.image_size,
    )
    trainer = build_trainer(
        run_dir, max_epochs=epochs, accelerator="auto", devices=1, enable_model_summary=False
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    collapse = next(c for c in trainer.callbacks if hasattr(c, "eps_values"))
    return summary, collapse.history


def demo_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One Markdown table comparing runs (the demo's, or ``compare``'s), with the baselines."""
    eps_values = [f"{eps:g}" for eps in TRAINING_EPS]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    rows = []
    for label, summary in summaries.items():
        unique = summary.get("unique_pct", {})
        rows.append(
            [label, pct(summary.get("knn/top1"))]
            + [f"{unique[e]:.1f}" if e in unique else "n/a" for e in eps_values]
            + [f"{summary.get('seconds_per_epoch') or 0:.1f}", f"{summary['peak_memory_mb']:.0f}"]
        )
    first = next(iter(summaries.values()))
    blanks = [""] * (len(eps_values) + 2)
    rows.append(["untrained encoder", pct(first.get("knn/untrained")), *blanks])
    rows.append(["raw pixels", pct(first.get("knn/pixels")), *blanks])
    header = ["prototypes", "k-NN top-1"] + [f"unique % ε={e}" for e in eps_values]
    return markdown_table(header + ["s/epoch", "peak MB"], rows)


def run_diagnose(argv: list[str]) -> int:
    """``protogmm diagnose CKPT``: unique prototypes over an ε sweep, usage, geometry plots.

    Reads protogmm's checkpoints and other projects' (DINO, iBOT, DINOv2 heads), weights
    only. With ``--data`` (protogmm checkpoints only) it also measures prototype usage of
    the teacher's embeddings over the held-out split and, when the training classes are
    long-tailed (at least two of the many / medium / few groups), the per-group k-NN and
    linear accuracy and prototype diversity beside the untrained encoder and raw pixels.
    ``--data checkpoint`` rebuilds the data the checkpoint was trained on.
    """
    parser = argparse.ArgumentParser(prog="protogmm diagnose", description=run_diagnose.__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument("--key", default=None, help="one prototype layer (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="plot folder (default: <checkpoint stem>-diagnose next to it)",
    )
    parser.add_argument(
        "--data",
        choices=(*DATA_MODULE_DATASETS, "checkpoint"),
        default=None,
        help="measure usage (and the long tail) on this data; 'checkpoint': the training data",
    )
    parser.add_argument(
        "--data-root", default=None, help="data.root of folder / cifar10 / cifar100 data"
    )
    parser.add_argument(
        "--data-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another data-module argument, e.g. imbalance_ratio=10 (repeatable; JSON values)",
    )
    args = parser.parse_args(argv)
    found = load_prototypes(args.checkpoint, key=args.key)
    print(describe_prototypes(found))
    # An imperfect set (a NaN or all-zero row) is measured on its usable rows, said so in
    # its row of the table; one bad layer does not stop the report on the others.
    usable = {name: _usable_rows(matrix) for name, matrix in found.items()}
    found = {name: matrix[usable[name]] for name, matrix in found.items()}
    curves = {
        name: unique_prototype_curve(matrix, args.eps)
        for name, matrix in found.items()
        if matrix.shape[0] > 0
    }
    header = ["prototypes", "K"] + [f"unique ε={eps:g}" for eps in args.eps] + ["angle TV"]
    rows = []
    for name, matrix in found.items():
        k, left_out = matrix.shape[0], int((~usable[name]).sum())
        size = f"{k} ({left_out} non-finite or zero rows left out)" if left_out else str(k)
        if k == 0:
            rows.append([name, size] + ["n/a"] * (len(args.eps) + 1))
            continue
        flatness = angle_flatness(prototype_angles(matrix)) if k >= 3 else float("nan")
        rows.append(
            [name, size]
            + [f"{curves[name][e]} ({100 * curves[name][e] / k:.1f}%)" for e in args.eps]
            + [f"{flatness:.2f}"]
        )
    print(markdown_table(header, rows))
    if args.data is not None:
        data = diagnose_datamodule(args.checkpoint, args.data, args.data_root, args.data_arg)
        module = load_module(args.checkpoint)
        print(usage_table(module, data))
        print(long_tail_text(module, load_module(args.checkpoint, trained=False), data))
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-diagnose")
    written = []
    if curves:
        sizes = {name: found[name].shape[0] for name in curves}
        written.append(plot_unique_vs_eps(curves, sizes, out / "unique_vs_eps.png"))
    # The angle density needs at least 3 prototypes (K = 1 or 2 has no geometry to plot).
    plottable = {n: m for n, m in found.items() if m.shape[0] >= 3}
    if plottable:
        written.append(plot_prototype_geometry(plottable, out / "prototype_geometry.png"))
    if written:
        print("plots: " + ", ".join(str(path) for path in written))
    return 0


def _usable_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``[K]`` mask of the finite, non-zero rows (Definition 2.1 needs a direction)."""
    return torch.isfinite(matrix).all(dim=1) & (matrix.abs().sum(dim=1) > 0)


def diagnose_datamodule(
    checkpoint: Path, dataset: str, root: str | None, data_args: list[str]
) -> SSLDataModule:
    """The data ``diagnose --data`` measures on: a named dataset, or the checkpoint's own."""
    overrides: dict[str, Any] = {}
    known = set(inspect.signature(SSLDataModule.__init__).parameters) - {"self"}
    for item in data_args:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise ValueError(
                f"--data-arg {item!r}: expected KEY=VALUE with KEY one of {sorted(known)}"
            )
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare string, e.g. dataset=folder
    if root is not None:
        overrides["root"] = root
    if dataset == "checkpoint":
        return datamodule_from_checkpoint(checkpoint, **overrides)
    return SSLDataModule(**({"dataset": dataset} | overrides))


def long_tail_text(module: PrototypicalSSL, untrained: PrototypicalSSL, data: SSLDataModule) -> str:
    """Per-group accuracy and prototype diversity, or why there is no per-group analysis."""
    groups = data.frequency_groups()
    if not data.is_long_tailed():
        many, few = groups.many_threshold, groups.few_threshold
        return (
            f"long tail: every training class falls in one frequency group (many > {many:g}, "
            f"few < {few:g}; data.longtail_thresholds): no per-group analysis"
        )
    results = {
        "trained": teacher_long_tail(module, data),
        "untrained encoder": teacher_long_tail(untrained, data, with_prototypes=False),
        "raw pixels": pixels_long_tail(data),
    }
    return longtail_markdown(groups, results, num_prototypes=module.hparams.num_prototypes)


def usage_table(module: PrototypicalSSL, data: SSLDataModule) -> str:
    """Prototype usage of the teacher's embeddings on the data's held-out split."""
    dataset = data.hparams.dataset
    _, test_loader = data.knn_dataloaders()
    accumulator = UsageAccumulator(module.hparams.num_prototypes)
    tau = module.hparams.teacher_temperature
    with torch.no_grad():
        for images, _ in test_loader:
            embeddings = module.embed(module.teacher, [images])
            if module.gmm is not None:
                probs = module.gmm.responsibilities(embeddings)
            else:
                probs = torch.softmax(module.teacher_prototypes(embeddings) / tau, dim=1)
            accumulator.update(probs)
    usage = accumulator.compute()
    return markdown_table(
        ["usage on " + dataset, "ever chosen", "effective number exp(H)", "mean sample H"],
        [
            [
                "held-out split",
                f"{usage['ever_chosen']:.0f} / {usage['num_prototypes']:.0f}",
                f"{usage['effective_number']:.1f}",
                f"{usage['mean_sample_entropy']:.2f}",
            ]
        ],
    )


def run_eval(argv: list[str]) -> int:
    """``protogmm eval knn|linear CKPT --data NAME``: frozen teacher-backbone evaluation.

    Prints the trained encoder beside the untrained one (same architecture, seed-0 init) and
    raw pixels, measured the same way.
    """
    parser = argparse.ArgumentParser(prog="protogmm eval", description=run_eval.__doc__)
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", choices=DATASETS, default="mnist5k")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    args = parser.parse_args(argv)
    trained = load_module(args.checkpoint)
    untrained = load_module(args.checkpoint, trained=False)
    train_loader, test_loader = SSLDataModule(dataset=args.data).knn_dataloaders()
    rows = []
    for label, encoder in (
        ("trained", trained.teacher["backbone"]),
        ("untrained encoder", untrained.teacher["backbone"]),
        ("raw pixels", None),
    ):
        train_x, train_y = extract_features(encoder, train_loader)
        test_x, test_y = extract_features(encoder, test_loader)
        if args.protocol == "knn":
            accuracy = knn_accuracy(
                train_x, train_y, test_x, test_y, k=args.k, temperature=args.temperature
            )
        else:
            accuracy = linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs)
        rows.append([label, f"{100 * accuracy:.1f}"])
    protocol = (
        f"k-NN (k={args.k}, T={args.temperature:g})"
        if args.protocol == "knn"
        else f"linear probe ({args.epochs} epochs)"
    )
    print(markdown_table([f"{protocol} on {args.data}", "top-1 %"], rows))
    return 0


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """A run directory's ``summary.json`` and its unique-prototype history from metrics.csv."""
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    if not run_dir.is_dir() or not summary_path.is_file() or not metrics_path.is_file():
        raise ValueError(
            f"{run_dir}: not a protogmm run directory (needs summary.json and metrics.csv)"
        )
    history = []
    with open(metrics_path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k.startswith("unique_pct/") and v}
            if values:
                history.append({"step": float(row["step"]), **values})
    return json.loads(summary_path.read_text()), history


def run_compare(argv: list[str]) -> int:
    """``protogmm compare RUN_DIR...``: one table and overlaid collapse plots across runs."""
    parser = argparse.ArgumentParser(prog="protogmm compare", description=run_compare.__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("compare"))
    args = parser.parse_args(argv)
    summaries, histories = {}, {}
    for run_dir in args.runs:
        label = run_dir.name if run_dir.name not in summaries else str(run_dir)
        summaries[label], histories[label] = read_run(run_dir)
    table = demo_table(summaries)
    plot = plot_collapse_over_training(
        histories, TRAINING_EPS, args.out / "collapse_over_training.png"
    )
    # The final ε sweep of every run on one axis (paper Fig. 3a).
    sizes = {label: summary["num_prototypes"] for label, summary in summaries.items()}
    curves = {
        label: {float(e): round(p * sizes[label] / 100) for e, p in s["unique_pct"].items()}
        for label, s in summaries.items()
        if s.get("unique_pct")
    }
    plots = [plot]
    if curves:
        plots.append(plot_unique_vs_eps(curves, sizes, args.out / "unique_vs_eps.png"))
    print(table)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


COMMANDS = {
    "fit": run_fit,
    "demo": run_demo,
    "diagnose": run_diagnose,
    "eval": run_eval,
    "compare": run_compare,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``protogmm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"error: unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}",
                file=sys.stderr,
            )
            return 2
        return 0
    sys.argv = sys.argv[:1]  # the sub-command parsers get argv explicitly
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError) as error:
        # Bad configuration values (the bricks' one-line ValueErrors name the key and value),
        # before any training starts; a file-system error (disk full, permission denied,
        # read-only) names its file. PROTOGMM_DEBUG=1 shows the traceback.
        if os.environ.get("PROTOGMM_DEBUG"):
            raise
        print(f"protogmm {argv[0]}: error: {_error_line(error)}", file=sys.stderr)
        return 2


def _error_line(error: Exception) -> str:
    """One line for an error: an OSError's file and reason, or the (one-line) message."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{os.fsdecode(error.filename)}: {error.strerror or type(error).__name__}"
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
