"""Paper claims 1-8 (paper-notes §6) judged on the finished benchmark runs; trains nothing.

    scripts/dev python benchmarks/claims.py                # the BENCHMARKS.md section
    scripts/dev python benchmarks/claims.py --no-write     # print it only

Reads the run directories the other benchmark scripts leave behind (``summary.json`` plus
``metrics.csv``, see :func:`_common.load_run`):

* ``benchmarks/decoupling.py`` (``--decoupling-dir``): ``joint-seed<s>``,
  ``decoupled-seed<s>`` (DINO) and the ablations, named by their label with spaces as
  underscores (``forgetting:_none-seed0``);
* ``benchmarks/longtail.py`` (``--longtail-dir``): ``{joint,decoupled}-rho<rho>-seed<s>``;
* ``benchmarks/hosts.py`` (``--hosts-dir``): ``<host>-{joint,decoupled,joint-koleo}-seed<s>``.

A directory without a readable ``summary.json`` is a run not finished (still running or
cut short) and is left out. For each claim the section holds one row per host or setting:
the rule with its threshold (the constants below), the numbers measured (mean ± std over
the seeds found; comparisons over the seeds both sides have), the verdict (``holds``,
``does not hold`` or ``not measured (run: <command>)``) and the run directories used. The
section is ``claims`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, load_run, mean_std, replace_section  # noqa: E402

# --- Thresholds of the rules (paper-notes §6) -------------------------------------------

#: The ε of Definition 2.1 the claims are judged at, as summary.json and metrics.csv key it.
CLAIM_EPS = "0.025"
#: The other ε reported at the end of training (claim 3).
OTHER_EPS = ("0.1", "0.25", "0.5")
#: Claim 1: joint's unique % at ε = 0.025 at the end of training must be below this.
JOINT_COLLAPSE_MAX_UNIQUE = 50.0
#: Claim 2: "early" means within this fraction of the training steps ...
EARLY_FRACTION_OF_STEPS = 0.10
#: ... and "most of the drop" means at least this share of the whole drop.
EARLY_MIN_SHARE_OF_DROP = 0.5
#: Claim 2: a drop (first logged minus last logged unique %, in points) larger than this
#: is a collapse to time. One prototype of K = 1024 is 0.1 point; a 1-point floor keeps a
#: handful of stray near-duplicates from counting as collapse.
COLLAPSE_MIN_DROP_POINTS = 1.0
#: Claim 3: decoupled's unique % at ε = 0.025 must stay at or above this during training.
DECOUPLED_MIN_UNIQUE = 99.0
#: Claim 4: the angle density counts as flat at or below this total-variation distance to
#: the uniform density (about twice the sampling noise floor of 0.07 for K = 1024 angles,
#: see :func:`protogmm.diagnostics.angle_flatness`: 0 = flat, near 1 = one spike).
ANGLE_FLAT_MAX_TV = 0.15
#: Claim 6: the frequency group judged (the tail).
TAIL_GROUP = "few"
LONGTAIL_GROUPS = ("many", "medium", "few")

# --- Where the runs are and what they are called -----------------------------------------

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
UNIQUE_COLUMN = f"unique_pct/eps={CLAIM_EPS}"
USAGE_COLUMN = "targets/argmax_used"
#: hosts.py's hosts, as its run directories and as printed.
HOST_NAMES = {"dino": "DINO", "ibot": "iBOT", "carp": "CARP"}
#: Claim 7: an ablation "lowers" uniqueness only by more than this many points (one
#: prototype of K = 1024 is 0.1 point) ...
ABLATION_MIN_UNIQUE_DROP_POINTS = 1.0
#: ... or usage (distinct argmax targets in a batch of 256 teacher rows) only by more than
#: this many prototypes: about 1.5 times the seed std of usage in the 3-seed DINO runs (13).
ABLATION_MIN_USAGE_DROP = 20.0
#: Claim 7's ablations: decoupling.py's ABLATIONS labels (its run dirs: spaces as '_').
ABLATION_LABELS = {
    "7a": "forgetting: none",
    "7b": "forgetting: time",
    "7c": "no annealing (β = 1)",
}

HOLDS = "holds"
FAILS = "does not hold"


# --- The rules: pure functions of numbers ------------------------------------------------


def joint_collapses(joint_unique_end: Sequence[float]) -> str:
    """Claim 1: the mean over seeds of joint's final unique % is below the threshold.

    Args:
        joint_unique_end: joint's unique % at ε = 0.025 at the end of training, per seed.

    Returns:
        ``holds`` or ``does not hold``.
    """
    return HOLDS if statistics.mean(joint_unique_end) < JOINT_COLLAPSE_MAX_UNIQUE else FAILS


def drop_and_early_share(
    steps: Sequence[float], unique_pct: Sequence[float], total_steps: float
) -> tuple[float, float | None]:
    """Claim 2 on one run: how far unique % falls, and which share of that by 10 % of steps.

    Args:
        steps: the training step of each logged value, ascending.
        unique_pct: the unique % logged at those steps.
        total_steps: the run's number of training steps.

    Returns:
        ``(drop, share)``: ``drop`` = first value minus last value (points); ``share`` = the
        part of the drop already reached at the last value logged at or before
        ``EARLY_FRACTION_OF_STEPS * total_steps``, over the drop. ``share`` is None when
        the drop is not above ``COLLAPSE_MIN_DROP_POINTS`` or nothing was logged that early.
    """
    drop = unique_pct[0] - unique_pct[-1]
    early = [
        v
        for s, v in zip(steps, unique_pct, strict=True)
        if s <= EARLY_FRACTION_OF_STEPS * total_steps
    ]
    if drop <= COLLAPSE_MIN_DROP_POINTS or not early:
        return drop, None
    return drop, (unique_pct[0] - early[-1]) / drop


def collapse_is_early(drops: Sequence[float], early_shares: Sequence[float | None]) -> str:
    """Claim 2: joint drops at all, and on average most of the drop comes early.

    Args:
        drops: each seed's drop of unique % (points), from :func:`drop_and_early_share`.
        early_shares: each seed's early share of its drop (None where it did not drop).

    Returns:
        ``does not hold (no collapse to time)`` when the mean drop is not above
        ``COLLAPSE_MIN_DROP_POINTS``; else ``holds`` when the mean early share over the
        seeds that dropped is at least ``EARLY_MIN_SHARE_OF_DROP``, ``does not hold``
        otherwise.
    """
    shares = [s for s in early_shares if s is not None]
    if statistics.mean(drops) <= COLLAPSE_MIN_DROP_POINTS or not shares:
        return f"{FAILS} (no collapse to time)"
    return HOLDS if statistics.mean(shares) >= EARLY_MIN_SHARE_OF_DROP else FAILS


def decoupled_never_collapses(decoupled_min_unique: Sequence[float]) -> str:
    """Claim 3: every seed's minimum unique % during training is at least the threshold.

    Args:
        decoupled_min_unique: per seed, decoupled's lowest unique % at ε = 0.025 logged.

    Returns:
        ``holds`` or ``does not hold``.
    """
    return HOLDS if min(decoupled_min_unique) >= DECOUPLED_MIN_UNIQUE else FAILS


def angles_flat_only_when_decoupled(
    joint_tv: Sequence[float], decoupled_tv: Sequence[float]
) -> str:
    """Claim 4: decoupled's angle density is flat and joint's is not (lower TV = flatter).

    Args:
        joint_tv: joint's ``angle_flatness`` (TV distance to uniform) per seed.
        decoupled_tv: decoupled's, per seed.

    Returns:
        ``holds`` when mean decoupled TV <= ``ANGLE_FLAT_MAX_TV`` < mean joint TV.
    """
    flat = statistics.mean(decoupled_tv) <= ANGLE_FLAT_MAX_TV
    return HOLDS if flat and statistics.mean(joint_tv) > ANGLE_FLAT_MAX_TV else FAILS


def not_worse_on_paired_seeds(differences: Sequence[float]) -> str:
    """Claims 5 and 6: decoupled minus joint, per paired seed, is not negative on average.

    Args:
        differences: decoupled's accuracy minus joint's, one per seed both have.

    Returns:
        ``does not hold`` when the mean difference is negative; ``holds (gain)`` when it
        exceeds the std of the differences (two seeds or more); ``holds (parity)``
        otherwise.
    """
    mean = statistics.mean(differences)
    if mean < 0:
        return FAILS
    if len(differences) >= 2 and mean > statistics.stdev(differences):
        return f"{HOLDS} (gain)"
    return f"{HOLDS} (parity)"


def ablation_lowers(unique_differences: Sequence[float], usage_differences: Sequence[float]) -> str:
    """Claim 7 (a), (b): the ablation lowers uniqueness or usage relative to full decoupled.

    Args:
        unique_differences: ablation minus full decoupled, unique % per paired seed.
        usage_differences: ablation minus full decoupled, prototypes used per paired seed
            (may be empty when usage was not logged).

    Returns:
        ``holds`` when the mean unique % falls by more than
        ``ABLATION_MIN_UNIQUE_DROP_POINTS`` or the mean usage by more than
        ``ABLATION_MIN_USAGE_DROP``.
    """
    lowers_unique = (
        bool(unique_differences)
        and statistics.mean(unique_differences) < -ABLATION_MIN_UNIQUE_DROP_POINTS
    )
    lowers_usage = (
        bool(usage_differences) and statistics.mean(usage_differences) < -ABLATION_MIN_USAGE_DROP
    )
    return HOLDS if lowers_unique or lowers_usage else FAILS


def fewer_used_early(usage_differences: Sequence[float]) -> str:
    """Claim 7 (c): without annealing fewer prototypes are used early.

    Args:
        usage_differences: ablation minus full decoupled, mean prototypes used in the first
            ``EARLY_FRACTION_OF_STEPS`` of training, per paired seed.

    Returns:
        ``holds`` when the mean usage falls by more than ``ABLATION_MIN_USAGE_DROP``.
    """
    return HOLDS if statistics.mean(usage_differences) < -ABLATION_MIN_USAGE_DROP else FAILS


def koleo_ordering(
    joint: Sequence[float], koleo: Sequence[float], decoupled: Sequence[float]
) -> str:
    """Claim 8: mean unique % orders joint < joint + KoLeo-proto < decoupled (strictly).

    Args:
        joint: joint's unique % at ε = 0.025 at the end, per seed.
        koleo: joint + KoLeo-proto's, per seed.
        decoupled: decoupled's, per seed.

    Returns:
        ``holds`` or ``does not hold``.
    """
    means = [statistics.mean(v) for v in (joint, koleo, decoupled)]
    return HOLDS if means[0] < means[1] < means[2] else FAILS


def combine_either(verdicts: Sequence[str]) -> str:
    """Claim 7 overall: holds if any part holds, else not measured if any part is, else not.

    Args:
        verdicts: the verdicts of 7 (a) and 7 (b).

    Returns:
        The first ``holds...`` verdict, else the first ``not measured ...`` one, else
        ``does not hold``.
    """
    for prefix in (HOLDS, "not measured"):
        found = [v for v in verdicts if v.startswith(prefix)]
        if found:
            return found[0]
    return FAILS


# --- Reading the runs ---------------------------------------------------------------------


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

    @property
    def total_steps(self) -> float:
        steps = self.summary.get("steps")
        return float(steps) if steps else max(self.series(UNIQUE_COLUMN)[0], default=0.0)


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


def only_seeds(runs: dict[int, Run], seeds: Sequence[int] | set[int]) -> dict[int, Run]:
    """The runs of the given seeds (those a comparison used)."""
    return {seed: run for seed, run in runs.items() if seed in seeds}


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
        if s <= EARLY_FRACTION_OF_STEPS * run.total_steps
    ]
    return statistics.mean(early) if early else None


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


@dataclass
class ClaimRow:
    """One line of the claims table."""

    claim: str
    criterion: str
    measured: str
    verdict: str
    runs: str = "–"

    def cells(self) -> list[str]:
        """The table cells, in :data:`HEADER` order."""
        return [self.claim, self.criterion, self.measured, self.verdict, self.runs]


HEADER = ["claim", "rule (threshold)", "measured (mean ± std over seeds)", "verdict", "runs used"]


def table(rows: list[ClaimRow]) -> str:
    """The rows as a Markdown table under :data:`HEADER`."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# --- The claims -----------------------------------------------------------------------------


@dataclass
class HostRuns:
    """Joint and decoupled runs of one host, and how to produce them."""

    host: str
    joint: dict[int, Run]
    decoupled: dict[int, Run]
    command: str


@dataclass
class Sources:
    """The three benchmark folders and the commands that fill them."""

    decoupling: RunFolder
    longtail: RunFolder
    hosts: RunFolder
    decoupling_long: RunFolder | None = None
    host_runs: list[HostRuns] = field(default_factory=list)

    def command(self, script: str, *arguments: str) -> str:
        """The exact command that writes the missing runs of ``script`` into its folder."""
        folder = getattr(self, script).directory
        out = [] if folder == DEFAULT_DIRS[script] else ["--out", str(folder)]
        return "scripts/dev python " + shlex.join([f"benchmarks/{script}.py", *arguments, *out])

    def not_measured(self, script: str, *arguments: str) -> str:
        """The verdict of a claim whose runs are missing, with the command to make them."""
        return f"not measured (run: `{self.command(script, *arguments)}`)"


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
            )
        )
    if sources.decoupling_long is not None:
        joint = sources.decoupling_long.runs("joint")
        decoupled = sources.decoupling_long.runs("decoupled")
        if joint and decoupled:
            out = display_path(sources.decoupling_long.directory)
            command = "scripts/dev python " + shlex.join(
                ["benchmarks/decoupling.py", "--reuse", *LONG_HORIZON_ARGUMENTS, "--out", out]
            )
            # Named by its budget, as the runs report it (e.g. "DINO, 2,000 steps").
            steps = next(iter(joint.values())).summary.get("steps")
            label = f"DINO, {steps:,} steps" if steps else "DINO, longer horizon"
            sources.host_runs.append(HostRuns(label, joint, decoupled, command))
    return sources


def hosts_to_show(sources: Sources, need_joint: bool, need_decoupled: bool) -> list[HostRuns]:
    """DINO always (its row says how to measure it); iBOT and CARP where their runs exist."""
    shown = []
    for host in sources.host_runs:
        has = (not need_joint or host.joint) and (not need_decoupled or host.decoupled)
        if host.host == "DINO" or has:
            shown.append(host)
    return shown


def claim_1(sources: Sources) -> list[ClaimRow]:
    """Partial collapse of joint prototypes, one row per host."""
    rule = f"joint's unique % at ε = {CLAIM_EPS} (end) < {JOINT_COLLAPSE_MAX_UNIQUE:g}"
    rows, missing = [], []
    for host in sources.host_runs:
        found = values(host.joint, unique_end)
        if not found:
            if host.host == "DINO":
                rows.append(ClaimRow(f"1 partial collapse ({host.host})", rule, "–", host.command))
            else:
                missing.append(host.host.lower())
            continue
        rows.append(
            ClaimRow(
                f"1 partial collapse ({host.host})",
                rule,
                f"joint {stat(found)}",
                joint_collapses(list(found.values())),
                describe_runs(host.joint),
            )
        )
    if missing:
        names = ", ".join(HOST_NAMES[h] for h in missing)
        rows.append(
            ClaimRow(
                f"1 partial collapse ({names})",
                rule,
                "–",
                sources.not_measured("hosts", "--hosts", *missing),
            )
        )
    return rows


def claim_2(sources: Sources) -> list[ClaimRow]:
    """Joint collapses early, from the unique % logged over the steps."""
    rule = (
        f"if joint's unique % (ε = {CLAIM_EPS}) drops (first − last > "
        f"{COLLAPSE_MIN_DROP_POINTS:g} points), ≥ {EARLY_MIN_SHARE_OF_DROP:.0%} of the drop "
        f"by {EARLY_FRACTION_OF_STEPS:.0%} of the steps"
    )
    rows = []
    for host in hosts_to_show(sources, need_joint=True, need_decoupled=False):
        drops, shares = {}, {}
        for seed, run in host.joint.items():
            steps, unique = run.series(UNIQUE_COLUMN)
            if unique:
                drops[seed], shares[seed] = drop_and_early_share(steps, unique, run.total_steps)
        name = f"2 collapse is early ({host.host})"
        if not drops:
            rows.append(ClaimRow(name, rule, "–", host.command))
            continue
        measured = f"drop {stat(drops)} points"
        known = {s: v for s, v in shares.items() if v is not None}
        if known:
            measured += f"; share by {EARLY_FRACTION_OF_STEPS:.0%} of steps {stat(known, 100, 0)} %"
        verdict = collapse_is_early(list(drops.values()), list(shares.values()))
        rows.append(ClaimRow(name, rule, measured, verdict, describe_runs(host.joint)))
    return rows


def claim_3(sources: Sources) -> list[ClaimRow]:
    """Decoupled prototypes never collapse; the larger ε at the end beside."""
    rule = (
        f"decoupled's unique % (ε = {CLAIM_EPS}) ≥ {DECOUPLED_MIN_UNIQUE:g} at every logged "
        f"step of every seed; ε = {' / '.join(OTHER_EPS)} at the end shown"
    )
    rows = []
    for host in hosts_to_show(sources, need_joint=False, need_decoupled=True):
        name = f"3 no collapse when decoupled ({host.host})"
        minimum = values(host.decoupled, unique_min)
        if not minimum:
            rows.append(ClaimRow(name, rule, "–", host.command))
            continue
        ends = []
        for kind, runs in (("joint", host.joint), ("decoupled", host.decoupled)):
            means = []
            for eps in OTHER_EPS:
                found = values(runs, lambda r, e=eps: unique_end(r, e))
                means.append(f"{statistics.mean(found.values()):.1f}" if found else "–")
            ends.append(f"{kind} {' / '.join(means)}")
        measured = f"decoupled min {stat(minimum)}; end at ε = {' / '.join(OTHER_EPS)}: " + (
            ", ".join(ends)
        )
        rows.append(
            ClaimRow(
                name,
                rule,
                measured,
                decoupled_never_collapses(list(minimum.values())),
                describe_runs(host.joint, host.decoupled),
            )
        )
    return rows


def claim_4(sources: Sources) -> list[ClaimRow]:
    """Flat angle density of the PCA-2 projection for decoupled, not for joint."""
    rule = (
        f"angle density TV to uniform (0 = flat): decoupled ≤ {ANGLE_FLAT_MAX_TV:g} < joint "
        "(means over paired seeds)"
    )
    rows = []
    for host in hosts_to_show(sources, need_joint=True, need_decoupled=True):
        name = f"4 flat angle density ({host.host})"
        joint_tv = values(host.joint, lambda r: r.summary["angle_flatness"])
        decoupled_tv = values(host.decoupled, lambda r: r.summary["angle_flatness"])
        joint, decoupled = paired(joint_tv, decoupled_tv)
        seeds = joint_tv.keys() & decoupled_tv.keys()
        if not joint:
            rows.append(ClaimRow(name, rule, "–", host.command))
            continue
        rows.append(
            ClaimRow(
                name,
                rule,
                f"TV joint {stat(joint, digits=3)}, decoupled {stat(decoupled, digits=3)}",
                angles_flat_only_when_decoupled(joint, decoupled),
                describe_runs(only_seeds(host.joint, seeds), only_seeds(host.decoupled, seeds)),
            )
        )
    return rows


def claim_5(sources: Sources) -> list[ClaimRow]:
    """k-NN parity or gain of decoupled, beside the untrained encoder and raw pixels."""
    rule = (
        "k-NN top-1 (k = 20): mean paired (decoupled − joint) ≥ 0; 'gain' only if it "
        "exceeds the std of the paired differences"
    )
    rows = []
    for host in hosts_to_show(sources, need_joint=True, need_decoupled=True):
        name = f"5 k-NN parity or gain ({host.host})"
        joint = values(host.joint, lambda r: r.summary["knn/top1"])
        decoupled = values(host.decoupled, lambda r: r.summary["knn/top1"])
        diff = differences(joint, decoupled)
        if not diff:
            rows.append(ClaimRow(name, rule, "–", host.command))
            continue
        a, b = paired(joint, decoupled)
        seeds = joint.keys() & decoupled.keys()
        measured = (
            f"joint {stat(a, 100)}, decoupled {stat(b, 100)}, difference {stat(diff, 100)} points"
        )
        for label, key in (("untrained", "knn/untrained"), ("raw pixels", "knn/pixels")):
            baseline = values(only_seeds(host.joint, seeds), lambda r, k=key: r.summary[k])
            if baseline:
                measured += f"; {label} {stat(baseline, 100)}"
        rows.append(
            ClaimRow(
                name,
                rule,
                measured,
                not_worse_on_paired_seeds(diff),
                describe_runs(only_seeds(host.joint, seeds), only_seeds(host.decoupled, seeds)),
            )
        )
    return rows


def group_accuracy(run: Run, protocol: str, group: str) -> float | None:
    """A long-tail run's accuracy (``knn`` or ``linear``) on one frequency group."""
    return run.summary["longtail"]["results"]["trained"][protocol][group]


def claim_6(sources: Sources) -> list[ClaimRow]:
    """Long tail: decoupled not worse on the tail group, one row per imbalance ratio."""
    rule = f"k-NN top-1 on the '{TAIL_GROUP}' (tail) group: mean paired (decoupled − joint) ≥ 0"
    rhos = sorted(
        {
            match.group(1)
            for name in sources.longtail.finished
            if (match := re.fullmatch(r"(?:joint|decoupled)-rho(\d+(?:\.\d+)?)-seed\d+", name))
        },
        key=float,
    )
    rows = []
    for rho in rhos:
        name = f"6 long tail (rho = {rho})"
        joint = sources.longtail.runs(f"joint-rho{rho}")
        decoupled = sources.longtail.runs(f"decoupled-rho{rho}")
        tail = differences(
            values(joint, lambda r: group_accuracy(r, "knn", TAIL_GROUP)),
            values(decoupled, lambda r: group_accuracy(r, "knn", TAIL_GROUP)),
        )
        if not tail:
            command = sources.not_measured("longtail", "--rho", rho)
            rows.append(ClaimRow(name, rule, "–", command, describe_runs(joint, decoupled)))
            continue
        parts = []
        for protocol in ("knn", "linear"):
            for group in LONGTAIL_GROUPS:
                a, b = paired(
                    values(joint, lambda r, p=protocol, g=group: group_accuracy(r, p, g)),
                    values(decoupled, lambda r, p=protocol, g=group: group_accuracy(r, p, g)),
                )
                if a:
                    parts.append(
                        f"{protocol} {group}: joint {stat(a, 100)}, decoupled {stat(b, 100)}"
                    )
        measured = "; ".join(parts) + f"; tail difference {stat(tail, 100)} points"
        rows.append(
            ClaimRow(
                name,
                rule,
                measured,
                not_worse_on_paired_seeds(tail),
                describe_runs(joint, decoupled),
            )
        )
    if not rows:
        rows.append(ClaimRow("6 long tail", rule, "–", sources.not_measured("longtail")))
    return rows


def claim_7(sources: Sources) -> list[ClaimRow]:
    """Ablations of forgetting and annealing against full decoupled of the same seed."""
    full = sources.decoupling.runs("decoupled")
    rows, either, missing = [], [], []
    for part, label in ABLATION_LABELS.items():
        ablation = sources.decoupling.runs(label.replace(" ", "_"))
        early = part == "7c"
        if early:
            rule = (
                f"'{label}': mean prototypes used (argmax) in the first "
                f"{EARLY_FRACTION_OF_STEPS:.0%} of steps < full decoupled's − "
                f"{ABLATION_MIN_USAGE_DROP:g} (paired seeds)"
            )
        else:
            rule = (
                f"'{label}': unique % (ε = {CLAIM_EPS}, end) < full decoupled's − "
                f"{ABLATION_MIN_UNIQUE_DROP_POINTS:g} points, or prototypes used (argmax, last "
                f"batch) < full decoupled's − {ABLATION_MIN_USAGE_DROP:g} (paired seeds)"
            )
        name = f"{part} ablation: {label}"
        unique_diff = differences(values(full, unique_end), values(ablation, unique_end))
        usage = usage_early if early else usage_last
        usage_diff = differences(values(full, usage), values(ablation, usage))
        measured_any = usage_diff if early else (unique_diff or usage_diff)
        if not measured_any:
            command = sources.not_measured("decoupling", "--reuse", "--ablations", label)
            rows.append(ClaimRow(name, rule, "–", command, describe_runs(ablation)))
            if not early:
                either.append(command)
                missing.append(label)
            continue
        shown = []
        for what, get in (
            ("unique % end", unique_end),
            ("min unique %", unique_min),
            ("used early" if early else "used", usage),
        ):
            a, b = paired(values(full, get), values(ablation, get))
            if a:
                shown.append(f"{what}: full {stat(a)}, ablation {stat(b)}")
        verdict = (
            fewer_used_early(usage_diff) if early else ablation_lowers(unique_diff, usage_diff)
        )
        either += [] if early else [verdict]
        used_full = {s: r for s, r in full.items() if s in ablation}
        rows.append(
            ClaimRow(name, rule, "; ".join(shown), verdict, describe_runs(used_full, ablation))
        )
    verdict = combine_either(either)
    if verdict.startswith("not measured"):
        verdict = sources.not_measured("decoupling", "--reuse", "--ablations", *missing)
    rows.append(
        ClaimRow("7 forgetting matters ((a) or (b))", "7a or 7b holds", "see 7a, 7b", verdict)
    )
    return rows


def koleo_weight(run: Run) -> str | None:
    """The KoLeo-proto weight a run trained with, from its ``hparams.yaml``."""
    try:
        text = (run.path / "hparams.yaml").read_text()
    except OSError:
        return None
    match = re.search(r"^koleo_weight:\s*(\S+)", text, re.M)
    return match.group(1) if match else None


def claim_8(sources: Sources) -> list[ClaimRow]:
    """Uniqueness order joint < joint + KoLeo-proto < decoupled, one row per host."""
    rule = f"unique % (ε = {CLAIM_EPS}, end): joint < joint + KoLeo-proto < decoupled (means)"
    rows = []
    for host, shown in HOST_NAMES.items():
        kinds = {
            slug: sources.hosts.runs(f"{host}-{slug}")
            for slug in ("joint", "joint-koleo", "decoupled")
        }
        if not any(kinds.values()):
            continue
        name = f"8 KoLeo-proto ordering ({shown})"
        found = [values(runs, unique_end) for runs in kinds.values()]
        seeds = sorted(set.intersection(*(set(f) for f in found)))
        if not seeds:
            command = sources.not_measured("hosts", "--hosts", host)
            rows.append(ClaimRow(name, rule, "–", command, describe_runs(*kinds.values())))
            continue
        joint, koleo, decoupled = ([f[s] for s in seeds] for f in found)
        weights = {koleo_weight(kinds["joint-koleo"][s]) for s in seeds} - {None}
        weight = f" (weight {', '.join(sorted(weights))})" if weights else ""
        measured = (
            f"joint {stat(joint)}, joint + KoLeo-proto{weight} {stat(koleo)}, "
            f"decoupled {stat(decoupled)}"
        )
        used = [{s: r for s, r in runs.items() if s in seeds} for runs in kinds.values()]
        rows.append(
            ClaimRow(
                name, rule, measured, koleo_ordering(joint, koleo, decoupled), describe_runs(*used)
            )
        )
    if not rows:
        rows.append(ClaimRow("8 KoLeo-proto ordering", rule, "–", sources.not_measured("hosts")))
    return rows


def build_section(
    decoupling_dir: Path,
    longtail_dir: Path,
    hosts_dir: Path,
    decoupling_long_dir: Path | None = None,
) -> str:
    """The Markdown of the "claims" section from whatever runs are finished."""
    sources = load_sources(decoupling_dir, longtail_dir, hosts_dir, decoupling_long_dir)
    rows = []
    for claim in (claim_1, claim_2, claim_3, claim_4, claim_5, claim_6, claim_7, claim_8):
        rows += claim(sources)
    folders = [sources.decoupling, sources.longtail, sources.hosts]
    folders += [sources.decoupling_long] if sources.decoupling_long is not None else []
    unfinished = [f"{display_path(f.directory)}/{name}" for f in folders for name in f.unfinished]
    notes = (
        "Claim 9 (overhead) is the head-cost section's. Unique % is Definition 2.1 at the "
        "ε shown, in % of K; k-NN in %. A row compares joint and decoupled over the seeds "
        "both have. Run directories without a readable summary.json (not finished) are "
        "left out: " + (", ".join(f"`{u}`" for u in unfinished) if unfinished else "none") + "."
    )
    return "\n\n".join(
        [
            "## Paper claims at small scale (paper-notes §6, claims 1–8)",
            f"Command: `{command_line()}`, {datetime.date.today().isoformat()}; trains "
            "nothing, reads the runs of `benchmarks/decoupling.py` (DINO at 5 epochs, and "
            "at the longer horizon as 'DINO, N steps' where its runs exist), "
            "`benchmarks/longtail.py` and `benchmarks/hosts.py` (iBOT, CARP, KoLeo-proto).  \n"
            + notes,
            table(rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoupling-dir", type=Path, default=DEFAULT_DIRS["decoupling"])
    parser.add_argument("--longtail-dir", type=Path, default=DEFAULT_DIRS["longtail"])
    parser.add_argument("--hosts-dir", type=Path, default=DEFAULT_DIRS["hosts"])
    parser.add_argument("--decoupling-long-dir", type=Path, default=DEFAULT_DIRS["decoupling_long"])
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    parser.add_argument(
        "--quick", action="store_true", help="for tests: read the given folders, print only"
    )
    args = parser.parse_args(argv)
    section = build_section(
        args.decoupling_dir, args.longtail_dir, args.hosts_dir, args.decoupling_long_dir
    )
    print(section, flush=True)
    if not args.no_write and not args.quick:
        replace_section("claims", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
