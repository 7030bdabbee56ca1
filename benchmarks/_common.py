"""What every benchmark script shares: the machine line, one training run, BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md, delimited by HTML comments
(``<!-- BEGIN name -->`` ... ``<!-- END name -->``), and replaces only that section, so the
numbers in the file are always the output of the last run of the script that owns them.
The scripts are modules of the ``benchmarks`` package, run from the repository root as
``scripts/dev python -m benchmarks.<name>``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

#: The repository root: the folder that holds the ``benchmarks`` package and BENCHMARKS.md.
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


def machine_line() -> str:
    """One line saying where the numbers come from (CPU, threads, torch, GPU if any)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{device}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def command_line() -> str:
    """The command that produced the numbers, as a user would type it.

    A module run with ``-m`` (every benchmark) is shown as ``python -m <module>``; a file run
    by path as that path, relative to the repository root where it lies under it.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return "scripts/dev python " + shlex.join(["-m", spec.name, *sys.argv[1:]])
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return "scripts/dev python " + shlex.join([str(script), *sys.argv[1:]])


def module_command(name: str, *arguments: str) -> str:
    """The command that runs benchmark ``name`` (a module of this package) with ``arguments``."""
    return "scripts/dev python " + shlex.join(["-m", f"benchmarks.{name}", *arguments])


def package_environment() -> dict[str, str]:
    """This process's environment with the repository root first on ``PYTHONPATH``, so that a
    child started as ``python -m benchmarks.<name>`` imports the package from any working
    directory (the tests run the scripts from a temporary one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def add_labels_argument(
    parser: argparse.ArgumentParser, flag: str, labels: Sequence[str], what: str
) -> None:
    """``flag LABEL ...``: a subset of ``labels`` (the rows of a table), all by default."""
    parser.add_argument(
        flag,
        nargs="*",
        default=list(labels),
        choices=list(labels),
        metavar="LABEL",
        help=f"{what} (default: all)",
    )


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


#: Smoke runs (``--quick``) see a few hundred images: a mixture that initialises from K
#: embeddings (OnlineGMM's default) would never be fitted within them, and nothing after it
#: (unique prototypes, the report) would run, so they initialise from the first batch.
QUICK_MIXTURE: dict[str, Any] = {"init_samples": 0}


def quick_model(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` for a smoke run: its mixture (if decoupled) fitted from the first batch."""
    return {**model, "gmm": {**QUICK_MIXTURE, **(model.get("gmm") or {})}}


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
    # Benchmarks describe a model in the flat layout (``{"host": "ibot", "koleo_weight":
    # 0.1}``), which from_hparams turns into the host and prototype-kind classes.
    module = PrototypicalSSL.from_hparams(
        {**model, "in_channels": datamodule.in_channels, "image_size": datamodule.image_size}
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
    summary = load_run(run_dir)
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def reuse_or_train(
    run_dir: Path,
    *,
    name: str,
    reuse: bool,
    epochs: int,
    seed: int,
    model: dict[str, Any],
    data: dict[str, Any],
    dense_every_n_steps: int = 5,
    required_key: str | None = None,
) -> dict[str, Any]:
    """The finished run in ``run_dir`` when ``reuse`` and :func:`reusable_run` accepts it, else
    a fresh :func:`train_run`; prints which, under ``name``.

    ``required_key``: a ``summary.json`` key the caller reads (e.g. ``"longtail"``); a
    finished run without it is retrained too.
    """
    previous = reusable_run(run_dir, epochs=epochs, model=model, data=data) if reuse else None
    if previous is not None and (required_key is None or required_key in previous):
        print(f"=== {name}: reusing {run_dir}", flush=True)
        return previous
    print(f"=== {name} -> {run_dir}", flush=True)
    return train_run(
        run_dir,
        epochs=epochs,
        seed=seed,
        model=model,
        data=data,
        dense_every_n_steps=dense_every_n_steps,
    )


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``summary.json`` plus the rows of its ``metrics.csv`` (``rows``)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        summary["rows"] = [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]
    return summary


class _HparamsLoader(yaml.SafeLoader):
    """Safe YAML loading of Lightning's ``hparams.yaml``, whose tuples carry a Python tag."""


_HparamsLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: loader.construct_sequence(node),  # type: ignore[arg-type]
)


def reusable_run(
    run_dir: Path, *, epochs: int, model: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any] | None:
    """A finished run in ``run_dir`` made with these settings (:func:`load_run`), else None.

    The run counts only when its ``summary.json`` has the same number of epochs and every key
    of ``model`` and ``data`` has the same value in its ``hparams.yaml`` (tuples compared as
    lists), so a run folder left by another configuration under the same name is retrained
    rather than silently reported. A decoupled run must also have been fitted with the
    mixture settings that :class:`~protogmm.prototypes.OnlineGMM` resolves today for
    ``model["gmm"]``, defaults included (the run's own record, ``summary["gmm"]``; an option
    added since counts at its default), so a run made before a default changed is retrained
    too; so is a decoupled run from before that record existed (its mixture predates
    today's defaults). ``anneal_steps`` (derived from the budget) is not compared.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists() or not (run_dir / "hparams.yaml").exists():
        return None
    summary = load_run(run_dir)
    if summary.get("epochs") != epochs:
        return None
    # Both sides in one flat view whatever their layout (the benchmarks describe models in
    # the flat one, runs since the classes record specs): the resume check's own.
    from protogmm.training.resume_check import comparable_data_settings, comparable_settings

    hparams = comparable_settings(run_hparams(run_dir))
    wanted_model = comparable_settings(model)
    for key, wanted in {**wanted_model, **comparable_data_settings(data)}.items():
        if _plain(hparams.get(key)) != _plain(wanted):
            return None
    if summary.get("prototypes") == "decoupled":
        made_with = summary.get("gmm")
        if made_with is None:
            return None
        # An option added since the run has the default that reproduces the former behaviour.
        made_with = {**gmm_settings(None), **made_with}
        overrides = wanted_model.get("prototypes.gmm")
        if _without_anneal_steps(made_with) != _without_anneal_steps(gmm_settings(overrides)):
            return None
    return summary


def run_hparams(run_dir: Path) -> dict[str, Any]:
    """A run's ``hparams.yaml`` (model and data settings), safely loaded."""
    return yaml.load((Path(run_dir) / "hparams.yaml").read_text(), Loader=_HparamsLoader) or {}


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML gives lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def gmm_settings(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Every ``OnlineGMM`` setting as it resolves today for ``overrides``.

    A one-component mixture resolves the arguments exactly as a run's would (its rules, e.g.
    ``mixing_eta`` from ``eta`` and the forgetting, are OnlineGMM's own).
    """
    from protogmm.prototypes import OnlineGMM

    return OnlineGMM(1, 1, **(overrides or {})).settings()


def _without_anneal_steps(settings: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in settings.items() if name != "anneal_steps"}


def column(summary: dict[str, Any], key: str) -> list[float]:
    """The logged values of one metric of a :func:`train_run` result, in step order."""
    return [row[key] for row in summary["rows"] if key in row]


class PeakMemory:
    """The peak memory of a block of code: ``with PeakMemory(device) as memory: ...``.

    On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``, reset at the start)
    and what was allocated at the start. On CPU: the resident set's high-water mark
    (``VmHWM``), reset at the start to the current resident set by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux), so the peak is the block's own and not an earlier
    one. Where that reset is unavailable the process's ``ru_maxrss`` (its peak since it
    started) stands in and ``exact`` is False. Measure in a fresh process when the numbers
    of several configurations must not see each other's allocator caches.

    Attributes:
        start_mib: memory at the start of the block (resident set, or CUDA allocated), MiB.
        peak_mib: the highest memory during the block, MiB.
        increase_mib: ``peak_mib - start_mib``: what the block added at its peak.
        exact: False when the CPU peak could not be reset (see above).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.start_mib = self.peak_mib = 0.0
        self.exact = True

    @property
    def increase_mib(self) -> float:
        return self.peak_mib - self.start_mib

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_mib = _proc_status_mib("VmRSS")
        except (OSError, ValueError):
            self.exact = False
            self.start_mib = _max_rss_mib()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = _proc_status_mib("VmHWM") if self.exact else _max_rss_mib()


def _proc_status_mib(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise ValueError(f"/proc/self/status has no {field}")
    return int(match.group(1)) / 1024


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
