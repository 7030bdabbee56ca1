"""What ``claims.py`` reads: the finished runs of the other benchmarks, and how it names them.

The run folders are those that ``decoupling.py``, ``longtail.py`` and ``hosts.py`` leave
behind (``summary.json`` plus ``metrics.csv``, see :func:`benchmarks._common.load_run`); a
folder without a readable ``summary.json`` is a run not finished and is left out.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._claim_rules import CLAIM_EPS, EARLY_FRACTION_OF_STEPS
from ._common import load_run, mean_std, module_command, run_hparams

DEFAULT_DIRS = {
    "decoupling": Path("runs/benchmarks/decoupling"),
    "longtail": Path("runs/benchmarks/longtail"),
    "hosts": Path("runs/benchmarks/hosts"),
    "decoupling_long": Path("runs/benchmarks/decoupling-long"),
}
#: decoupling.py's arguments for its longer-horizon section (BENCHMARKS "... 16 epochs at
#: batch 32, K = 4096"), the budget at which the encoder learns beyond its initialisation.
LONG_HORIZON_ARGUMENTS = (
    "--epochs",
    "16",
    "--batch-size",
    "32",
    "--num-prototypes",
    "4096",
    "--dense-every",
    "50",
    "--section",
    "decoupling-long",
    "--plot",
    "docs/decoupling-long-collapse.png",
)
#: hosts.py's hosts, as its run directories and as printed.
HOST_NAMES = {"dino": "DINO", "ibot": "iBOT", "carp": "CARP"}
UNIQUE_COLUMN = f"unique_pct/eps={CLAIM_EPS}"
USAGE_COLUMN = "targets/argmax_used"


@dataclass(frozen=True)
class Run:
    """One finished run: its directory, seed and ``summary.json`` (plus ``rows``)."""

    path: Path
    seed: int
    summary: dict[str, Any]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of one metrics.csv column, in step order."""
        pairs = sorted(
            (row["step"], row[key]) for row in self.summary["rows"] if key in row and "step" in row
        )
        return [s for s, _ in pairs], [v for _, v in pairs]


class RunFolder:
    """Every run directory under one benchmark's output folder, finished or not."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.finished: dict[str, dict[str, Any]] = {}
        self.unfinished: list[str] = []
        if not self.directory.is_dir():
            return
        for child in sorted(self.directory.iterdir()):
            if not child.is_dir():
                continue
            try:
                self.finished[child.name] = load_run(child)
            except (OSError, ValueError, TypeError, KeyError):
                self.unfinished.append(child.name)

    def runs(self, stem: str) -> dict[int, Run]:
        """The finished runs named ``<stem>-seed<s>``, by seed."""
        pattern = re.compile(re.escape(stem) + r"-seed(\d+)")
        found = {}
        for name, summary in self.finished.items():
            match = pattern.fullmatch(name)
            if match:
                seed = int(match.group(1))
                found[seed] = Run(self.directory / name, seed, summary)
        return dict(sorted(found.items()))


def values(runs: dict[int, Run], get: Callable[[Run], float | None]) -> dict[int, float]:
    """``get`` of each run, by seed, leaving out runs where it is missing or not finite."""
    found = {}
    for seed, run in runs.items():
        try:
            value = get(run)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        if value is not None and math.isfinite(value):
            found[seed] = float(value)
    return found


def paired(first: dict[int, float], second: dict[int, float]) -> tuple[list[float], list[float]]:
    """The values of the seeds both have, in seed order."""
    seeds = sorted(first.keys() & second.keys())
    return [first[s] for s in seeds], [second[s] for s in seeds]


def differences(first: dict[int, float], second: dict[int, float]) -> list[float]:
    """``second - first`` per seed both have."""
    a, b = paired(first, second)
    return [y - x for x, y in zip(a, b, strict=True)]


def paired_values(
    groups: Sequence[dict[int, Run]], get: Callable[[Run], float | None]
) -> tuple[set[int], list[list[float]]]:
    """The seeds every group has a value of ``get`` for, and those values per group (in
    seed order): the seeds a comparison of the groups uses."""
    found = [values(runs, get) for runs in groups]
    seeds = set.intersection(*(set(f) for f in found))
    return seeds, [[f[s] for s in sorted(seeds)] for f in found]


def only_seeds(runs: dict[int, Run], seeds: Collection[int]) -> dict[int, Run]:
    """The runs of the given seeds (those a comparison used)."""
    return {seed: run for seed, run in runs.items() if seed in seeds}


# --- What a run measured -------------------------------------------------------------------


def total_steps(run: Run) -> float:
    """The run's training steps (``summary.json``), else the last step it logged unique % at."""
    steps = run.summary.get("steps")
    return float(steps) if steps else max(run.series(UNIQUE_COLUMN)[0], default=0.0)


def unique_end(run: Run, eps: str = CLAIM_EPS) -> float:
    """Unique % at ``eps`` at the end of training (``summary.json``)."""
    return run.summary["unique_pct"][eps]


def unique_min(run: Run) -> float | None:
    """The lowest unique % at ε = 0.025 logged during training."""
    return min(run.series(UNIQUE_COLUMN)[1], default=None)


def usage_last(run: Run) -> float | None:
    """Prototypes used as argmax targets in the last logged batch."""
    used = run.series(USAGE_COLUMN)[1]
    return used[-1] if used else None


def usage_early(run: Run) -> float | None:
    """Mean prototypes used as argmax targets over the first 10 % of the steps."""
    steps, used = run.series(USAGE_COLUMN)
    early = [
        u
        for s, u in zip(steps, used, strict=True)
        if s <= EARLY_FRACTION_OF_STEPS * total_steps(run)
    ]
    return statistics.mean(early) if early else None


def group_accuracy(run: Run, protocol: str, group: str) -> float | None:
    """A long-tail run's accuracy (``knn`` or ``linear``) on one frequency group."""
    return run.summary["longtail"]["results"]["trained"][protocol][group]


def koleo_weight(run: Run) -> str | None:
    """The KoLeo-proto weight a run trained with, from its ``hparams.yaml``."""
    try:
        from protogmm.training.resume_check import comparable_settings

        model = comparable_settings(run_hparams(run.path))
    except (OSError, ValueError):
        return None
    weight = model.get("prototypes.koleo_weight")  # joint and partial runs only
    return None if weight is None else f"{weight:g}"


# --- Formatting ----------------------------------------------------------------------------


def stat(found: dict[int, float] | Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std (n seeds)``, or ``–`` when there is nothing."""
    numbers = list(found.values()) if isinstance(found, dict) else list(found)
    if not numbers:
        return "–"
    return f"{mean_std(numbers, scale, digits)} ({len(numbers)} seed{'s' * (len(numbers) > 1)})"


def display_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe_runs(*groups: dict[int, Run]) -> str:
    """The run directories used, compressed: ``runs/.../decoupling: joint-seed{0,1}``."""
    by_folder: dict[str, dict[str, list[int]]] = {}
    epochs: set[str] = set()
    for runs in groups:
        for run in runs.values():
            stem = run.path.name.rsplit("-seed", 1)[0]
            by_folder.setdefault(display_path(run.path.parent), {}).setdefault(stem, [])
            by_folder[display_path(run.path.parent)][stem].append(run.seed)
            epochs.add(str(run.summary.get("epochs", "?")))
    if not by_folder:
        return "–"
    parts = []
    for folder, stems in by_folder.items():
        names = []
        for stem, seeds in stems.items():
            seeds = sorted(set(seeds))
            shown = str(seeds[0]) if len(seeds) == 1 else "{" + ",".join(map(str, seeds)) + "}"
            names.append(f"{stem}-seed{shown}")
        parts.append(f"{folder}/: " + ", ".join(names))
    return "; ".join(parts) + f" ({'/'.join(sorted(epochs))} epochs)"


# --- The sources ---------------------------------------------------------------------------


@dataclass
class HostRuns:
    """Joint and decoupled runs of one host, and how to produce them.

    Attributes:
        host: the name printed in the rows ("DINO", "iBOT", "DINO, 2,000 steps").
        joint: the joint runs, by seed.
        decoupled: the decoupled runs, by seed.
        command: the verdict of a row whose runs are missing (it says how to make them).
        key: hosts.py's name of the host (its ``--hosts``); None for decoupling.py's runs.
    """

    host: str
    joint: dict[int, Run]
    decoupled: dict[int, Run]
    command: str
    key: str | None = None


@dataclass
class Sources:
    """The benchmark folders and the commands that fill them."""

    decoupling: RunFolder
    longtail: RunFolder
    hosts: RunFolder
    decoupling_long: RunFolder | None = None
    host_runs: list[HostRuns] = field(default_factory=list)

    def command(self, script: str, *arguments: str) -> str:
        """The exact command that writes the missing runs of ``script`` into its folder."""
        folder = getattr(self, script).directory
        out = [] if folder == DEFAULT_DIRS[script] else ["--out", str(folder)]
        return module_command(script, *arguments, *out)

    def not_measured(self, script: str, *arguments: str) -> str:
        """The verdict of a claim whose runs are missing, with the command to make them."""
        return f"not measured (run: `{self.command(script, *arguments)}`)"

    def folders(self) -> list[RunFolder]:
        """The folders read (the longer horizon's where it was given)."""
        folders = [self.decoupling, self.longtail, self.hosts]
        return folders + ([self.decoupling_long] if self.decoupling_long is not None else [])


def load_sources(
    decoupling_dir: Path,
    longtail_dir: Path,
    hosts_dir: Path,
    decoupling_long_dir: Path | None = None,
) -> Sources:
    """Read the folders; the joint / decoupled runs of DINO, iBOT and CARP, and of DINO at the
    longer horizon where both kinds have finished runs there."""
    sources = Sources(
        RunFolder(decoupling_dir),
        RunFolder(longtail_dir),
        RunFolder(hosts_dir),
        RunFolder(decoupling_long_dir) if decoupling_long_dir is not None else None,
    )
    sources.host_runs.append(
        HostRuns(
            "DINO",
            sources.decoupling.runs("joint"),
            sources.decoupling.runs("decoupled"),
            sources.not_measured("decoupling"),
        )
    )
    for host in ("ibot", "carp"):
        sources.host_runs.append(
            HostRuns(
                HOST_NAMES[host],
                sources.hosts.runs(f"{host}-joint"),
                sources.hosts.runs(f"{host}-decoupled"),
                sources.not_measured("hosts", "--hosts", host),
                key=host,
            )
        )
    if sources.decoupling_long is not None:
        joint = sources.decoupling_long.runs("joint")
        decoupled = sources.decoupling_long.runs("decoupled")
        if joint and decoupled:
            out = display_path(sources.decoupling_long.directory)
            command = module_command("decoupling", "--reuse", *LONG_HORIZON_ARGUMENTS, "--out", out)
            # Named by its budget, as the runs report it (e.g. "DINO, 2,000 steps").
            steps = next(iter(joint.values())).summary.get("steps")
            label = f"DINO, {steps:,} steps" if steps else "DINO, longer horizon"
            sources.host_runs.append(HostRuns(label, joint, decoupled, command))
    return sources
