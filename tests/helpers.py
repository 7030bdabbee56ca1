"""What the test files share: the tiny model, data and runs, and the child processes.

Imported as ``from helpers import ...`` from every test folder, as ``tests/data`` imports
``imagefiles``: pytest puts the folder of ``tests/conftest.py`` on ``sys.path`` (its default
``prepend`` import mode, for a folder without ``__init__.py``), and ruff's ``src`` setting
sorts it as first-party. A child process gets the folder (and the repository root, for
``benchmarks``) from :func:`child_environment`. Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch

from benchmarks import _common
from protogmm.training.datamodule import SSLDataModule, merge_data_settings
from protogmm.training.module import PrototypicalSSL
from protogmm.training.runner import build_trainer

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent

# ---------------------------------------------------------------------- the tiny model
#: 16 px grayscale inputs, K = 32 prototypes, a 32-wide head with a 16-d bottleneck.
TINY_SHAPES = {
    "in_channels": 1,
    "image_size": 16,
    "num_prototypes": 32,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
}
TINY_CONVNET = {"backbone": "convnet", "backbone_kwargs": {"width": 8}}
#: A one-block ViT (patch tokens, for iBOT); no BatchNorm in its head.
TINY_VIT = {
    "backbone": "vit",
    "backbone_kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "head_bn": False,
}
TINY_MODEL = TINY_CONVNET | TINY_SHAPES
#: The tiny model on RGB class folders, K = 16.
FOLDER_MODEL = TINY_MODEL | {"in_channels": 3, "num_prototypes": 16}
#: Warm-up and prototype freeze over half an epoch (2 of the 4 steps of :data:`TINY_DATA`).
HALF_EPOCH_WARMUP = {"warmup_epochs": 0.5, "freeze_prototypes_epochs": 0.5}

# ---------------------------------------------------------------------- the tiny data
#: 64 synthetic 16 px images, batch 16 (4 steps an epoch), 2 local crops.
TINY_DATA = {
    "dataset": "synthetic",
    "batch_size": 16,
    "num_local_crops": 2,
    "synthetic": {"samples": 64, "image_size": 16},
}
#: ``protogmm fit``'s arguments for :data:`TINY_MODEL` on :data:`TINY_DATA`'s images (the
#: data module's default local crops). A later repeat of an argument overrides it.
TINY_FIT = [
    "--data.dataset=synthetic",
    "--data.synthetic.samples=64",
    "--data.synthetic.image_size=16",
    "--data.batch_size=16",
    "--model.num_prototypes=32",
    "--model.hidden_dim=32",
    "--model.bottleneck_dim=16",
    "--model.backbone_kwargs={width: 8}",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def tiny_data(**overrides: object) -> SSLDataModule:
    """:data:`TINY_DATA` with ``overrides`` (a group's mapping replaces only its options)."""
    return SSLDataModule(**merge_data_settings(TINY_DATA, overrides))


def training_batch(size: int = 8, **data: object) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The first ``size`` images of ``tiny_data(**data)``'s training set (every view), labels."""
    module = tiny_data(**data)
    module.setup("fit")
    return next(iter(torch.utils.data.DataLoader(module.train_set, batch_size=size)))


# ---------------------------------------------------------------------- steps and runs
def without_a_trainer(model: PrototypicalSSL, step: int = 0) -> PrototypicalSSL:
    """Stubs what a trainer gives ``model``: the schedules at ``step`` of 10 (5 an epoch),
    and logging (dropped)."""
    model._current_schedule = lambda: model.schedule_at(step, 10, 5)
    model.log_dict = lambda *args, **kwargs: None
    model.log = lambda *args, **kwargs: None
    return model


def one_step(model: PrototypicalSSL, batch: tuple | None = None, step: int = 0) -> torch.Tensor:
    """One training step outside a trainer (see :func:`without_a_trainer`), with its
    backward pass; ``batch`` is :func:`training_batch` unless given."""
    loss = without_a_trainer(model, step).training_step(batch or training_batch(), 0)
    loss.backward()
    return loss


class CrashAtStep(L.Callback):
    """Raises when the run reaches ``step`` (on every rank): a killed job, as the next
    start sees it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit_tiny(
    run_dir: Path,
    model: dict[str, object],
    data: L.LightningDataModule | None = None,
    *,
    ckpt_path: str | Path | None = None,
    crash_at_step: int | None = None,
    callbacks: Iterable[L.Callback] = (),
    **trainer: object,
) -> tuple[PrototypicalSSL, L.Trainer]:
    """Seeds 0, builds ``PrototypicalSSL(**model)`` and fits it on ``data`` (default:
    :func:`tiny_data`) with :func:`build_trainer`'s run callbacks writing into ``run_dir``.

    ``trainer``: :func:`build_trainer`'s keywords over one epoch on the CPU without progress
    bar or model summary. ``crash_at_step``: a :class:`CrashAtStep` first among the callbacks.
    """
    L.seed_everything(0, verbose=False)
    module = PrototypicalSSL.from_hparams(model)
    crash = [CrashAtStep(crash_at_step)] if crash_at_step is not None else []
    settings = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    run = build_trainer(run_dir, **(settings | trainer), callbacks=[*crash, *callbacks])
    run.fit(module, datamodule=data or tiny_data(), ckpt_path=ckpt_path)
    return module, run


#: One deterministic process, the collapse monitor's dense measure every 2 steps: for runs
#: compared step by step (a resumed run with the uninterrupted one).
STEP_BY_STEP = {"devices": 1, "deterministic": True, "dense_every_n_steps": 2}


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/metrics.csv``."""
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def logged(run_dir: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) of every row of ``metrics.csv`` with a value in ``column``."""
    return [
        (int(row["step"]), float(row[column])) for row in metric_rows(run_dir) if row.get(column)
    ]


# ---------------------------------------------------------------------- child processes
def child_environment(*paths: str | Path) -> dict[str, str]:
    """This process's environment for a child: ``paths``, this folder and the repository
    root first on ``PYTHONPATH`` (so the child imports this module too), one intra-op thread."""
    env = dict(os.environ)
    ours = [*paths, TESTS, REPO_ROOT]
    entries = [*map(str, ours), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["OMP_NUM_THREADS"] = "1"  # tiny runs: one thread is faster here (see conftest.py)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``protogmm ARGS`` in a child process (the quick demo alone takes minutes)."""
    return subprocess.run(
        [sys.executable, "-m", "protogmm.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_environment(),
    )


def fit_error_line(tmp_path: Path, *args: str) -> str:
    """``protogmm fit ARGS`` into ``tmp_path/run`` in a child process: it must fail with one
    (non-blank) line on stderr, before training (no ``metrics.csv``). Returns the line."""
    run_dir = tmp_path / "run"
    result = run_cli("fit", *args, "--trainer.default_root_dir", str(run_dir), cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert not (run_dir / "metrics.csv").exists()
    return lines[0]


# ---------------------------------------------------------------------- benchmark scripts
def run_benchmark(name: str, *args: str, cwd: Path, timeout: float) -> str:
    """``python -m benchmarks.<name> ARGS`` from ``cwd``, the package on ``PYTHONPATH`` as
    the scripts set it up; it must exit 0. Returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_common.package_environment(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def benchmarks_section(name: str) -> str | None:
    """Section ``name`` of BENCHMARKS.md, or None. A script's --quick run must leave its own
    section as it was (other scripts may write theirs meanwhile)."""
    text = (REPO_ROOT / "BENCHMARKS.md").read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    return text[text.index(begin) : text.index(end)] if begin in text and end in text else None
