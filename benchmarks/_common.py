"""What every benchmark script shares: the machine line, one training run, BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md, delimited by HTML comments
(``<!-- BEGIN name -->`` ... ``<!-- END name -->``), and replaces only that section, so the
numbers in the file are always the output of the last run of the script that owns them.
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_line() -> str:
    """One line saying where the numbers come from (CPU, threads, torch, GPU if any)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{device}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def command_line() -> str:
    """The command that produced the numbers, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(BENCHMARKS_MD.parent)
    except ValueError:
        pass
    return "scripts/dev python " + shlex.join([str(script), *sys.argv[1:]])


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Write ``body`` as section ``name`` of ``path``: replaced in place, or appended.

    The file is written to a temporary sibling and renamed, so an interrupted run never
    leaves a half-written BENCHMARKS.md.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std over seeds), or the single value when there is one."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def train_run(
    run_dir: Path,
    *,
    epochs: int,
    seed: int,
    model: dict[str, Any],
    data: dict[str, Any],
    dense_every_n_steps: int = 5,
) -> dict[str, Any]:
    """Train one configuration and return its ``summary.json`` plus its metric columns.

    The run is the one ``protogmm fit`` would do with these keys (same module, data module
    and trainer builder); ``rows`` holds the rows of ``metrics.csv`` (each with its
    ``step``), and ``wall_seconds`` is the whole fit, evaluations included.
    """
    from protogmm.training.datamodule import SSLDataModule
    from protogmm.training.module import PrototypicalSSL
    from protogmm.training.runner import build_trainer

    L.seed_everything(seed, verbose=False)
    datamodule = SSLDataModule(seed=seed, **data)
    module = PrototypicalSSL(
        in_channels=datamodule.in_channels, image_size=datamodule.image_size, **model
    )
    trainer = build_trainer(
        run_dir,
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        dense_every_n_steps=dense_every_n_steps,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        summary["rows"] = [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]
    return summary


def column(summary: dict[str, Any], key: str) -> list[float]:
    """The logged values of one metric of a :func:`train_run` result, in step order."""
    return [row[key] for row in summary["rows"] if key in row]
