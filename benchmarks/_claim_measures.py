"""What ``claims.py`` judges each claim on (its subjects) and what it measures there.

A subject is one row of a claim: a host, a long-tail ratio or an ablation, with its runs by
role. A claim's measure turns a subject's runs into the numbers shown and the verdict of the
claim's rule (``_claim_rules``), or None when the runs it needs are missing.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from ._claim_rules import (
    EARLY_FRACTION_OF_STEPS,
    LONGTAIL_GROUPS,
    OTHER_EPS,
    TAIL_GROUP,
    ablation_lowers,
    angles_flat_only_when_decoupled,
    collapse_is_early,
    decoupled_never_collapses,
    drop_and_early_share,
    fewer_used_early,
    joint_collapses,
    koleo_ordering,
    not_worse_on_paired_seeds,
)
from ._claim_runs import (
    HOST_NAMES,
    UNIQUE_COLUMN,
    Run,
    Sources,
    describe_runs,
    group_accuracy,
    koleo_weight,
    only_seeds,
    paired_values,
    stat,
    total_steps,
    unique_end,
    unique_min,
    usage_early,
    usage_last,
    values,
)


@dataclass(frozen=True)
class Subject:
    """What one row of a claim judges: a host, a long-tail ratio or an ablation.

    Attributes:
        label: the row's name in brackets after the claim's ("DINO", "rho = 10"); None for
            a claim with one subject (or none found: its runs are then empty).
        runs: its runs by role ("joint", "decoupled", "full", "ablation", ...), by seed.
        missing: the verdict when it is not measured (how to make its runs).
        missing_runs: the "runs used" cell when it is not measured.
        merge_key: the argument naming it in a merged command (``Claim.merge_command``).
    """

    label: str | None
    runs: dict[str, dict[int, Run]]
    missing: str
    missing_runs: str = "–"
    merge_key: str | None = None


@dataclass(frozen=True)
class Measured:
    """A subject's measured row: the numbers, the verdict of the rule, the runs used."""

    measured: str
    verdict: str
    runs: str


# --- Subjects: the rows a claim reads --------------------------------------------------------


def hosts_with(*roles: str) -> Callable[[Sources], list[Subject]]:
    """The hosts whose ``roles`` runs exist (every host without roles), and DINO always (its
    row then says how to measure it)."""

    def select(sources: Sources) -> list[Subject]:
        return [
            Subject(
                host.host,
                {"joint": host.joint, "decoupled": host.decoupled},
                host.command,
                merge_key=host.key,
            )
            for host in sources.host_runs
            if host.host == "DINO" or all(getattr(host, role) for role in roles)
        ]

    return select


def longtail_ratios(sources: Sources) -> list[Subject]:
    """One subject per imbalance ratio that longtail.py has a finished run of (none found: the
    claim as a whole, not measured)."""
    names = (
        re.fullmatch(r"(?:joint|decoupled)-rho(\d+(?:\.\d+)?)-seed\d+", name)
        for name in sources.longtail.finished
    )
    subjects = []
    for rho in sorted({match.group(1) for match in names if match}, key=float):
        joint = sources.longtail.runs(f"joint-rho{rho}")
        decoupled = sources.longtail.runs(f"decoupled-rho{rho}")
        missing = sources.not_measured("longtail", "--rho", rho)
        runs = {"joint": joint, "decoupled": decoupled}
        subjects.append(Subject(f"rho = {rho}", runs, missing, describe_runs(joint, decoupled)))
    empty: dict[str, dict[int, Run]] = {"joint": {}, "decoupled": {}}
    return subjects or [Subject(None, empty, sources.not_measured("longtail"))]


def ablation_runs(label: str) -> Callable[[Sources], list[Subject]]:
    """decoupling.py's ablation ``label`` beside its full decoupled runs (one subject)."""

    def select(sources: Sources) -> list[Subject]:
        runs = sources.decoupling.runs(label.replace(" ", "_"))
        missing = sources.not_measured("decoupling", "--reuse", "--ablations", label)
        roles = {"full": sources.decoupling.runs("decoupled"), "ablation": runs}
        return [Subject(None, roles, missing, describe_runs(runs), merge_key=label)]

    return select


def koleo_hosts(sources: Sources) -> list[Subject]:
    """The hosts with any hosts.py run of joint, joint + KoLeo-proto or decoupled (none found:
    the claim as a whole, not measured)."""
    subjects = []
    slugs = ("joint", "joint-koleo", "decoupled")
    for host, shown in HOST_NAMES.items():
        kinds = {slug: sources.hosts.runs(f"{host}-{slug}") for slug in slugs}
        if any(kinds.values()):
            missing = sources.not_measured("hosts", "--hosts", host)
            subjects.append(Subject(shown, kinds, missing, describe_runs(*kinds.values())))
    empty: dict[str, dict[int, Run]] = {slug: {} for slug in slugs}
    return subjects or [Subject(None, empty, sources.not_measured("hosts"))]


# --- What each claim measures ----------------------------------------------------------------


def used(subject: Subject, seeds: set[int]) -> str:
    """The runs of every role of ``subject`` that a comparison over ``seeds`` used."""
    return describe_runs(*(only_seeds(runs, seeds) for runs in subject.runs.values()))


def partial_collapse(subject: Subject) -> Measured | None:
    """Claim 1: joint's unique % at the end."""
    joint = subject.runs["joint"]
    found = values(joint, unique_end)
    if not found:
        return None
    verdict = joint_collapses(list(found.values()))
    return Measured(f"joint {stat(found)}", verdict, describe_runs(joint))


def collapse_timing(subject: Subject) -> Measured | None:
    """Claim 2: joint's drop of unique % over the logged steps, and its early share."""
    joint = subject.runs["joint"]
    drops, shares = {}, {}
    for seed, run in joint.items():
        steps, unique = run.series(UNIQUE_COLUMN)
        if unique:
            drops[seed], shares[seed] = drop_and_early_share(steps, unique, total_steps(run))
    if not drops:
        return None
    measured = f"drop {stat(drops)} points"
    known = {s: v for s, v in shares.items() if v is not None}
    if known:
        measured += f"; share by {EARLY_FRACTION_OF_STEPS:.0%} of steps {stat(known, 100, 0)} %"
    verdict = collapse_is_early(list(drops.values()), list(shares.values()))
    return Measured(measured, verdict, describe_runs(joint))


def decoupled_minimum(subject: Subject) -> Measured | None:
    """Claim 3: decoupled's lowest unique % during training; both kinds' larger ε at the end."""
    minimum = values(subject.runs["decoupled"], unique_min)
    if not minimum:
        return None
    ends = []
    for kind, runs in subject.runs.items():
        means = []
        for eps in OTHER_EPS:
            found = values(runs, lambda r, e=eps: unique_end(r, e))
            means.append(f"{statistics.mean(found.values()):.1f}" if found else "–")
        ends.append(f"{kind} {' / '.join(means)}")
    measured = f"decoupled min {stat(minimum)}; end at ε = {' / '.join(OTHER_EPS)}: " + (
        ", ".join(ends)
    )
    verdict = decoupled_never_collapses(list(minimum.values()))
    return Measured(measured, verdict, describe_runs(*subject.runs.values()))


def angle_flatness(subject: Subject) -> Measured | None:
    """Claim 4: the angle density's TV distance to uniform, over the paired seeds."""
    seeds, (joint, decoupled) = paired_values(
        list(subject.runs.values()), lambda r: r.summary["angle_flatness"]
    )
    if not seeds:
        return None
    measured = f"TV joint {stat(joint, digits=3)}, decoupled {stat(decoupled, digits=3)}"
    verdict = angles_flat_only_when_decoupled(joint, decoupled)
    return Measured(measured, verdict, used(subject, seeds))


def knn(subject: Subject) -> Measured | None:
    """Claim 5: k-NN of both kinds over the paired seeds, the untrained encoder and pixels."""
    seeds, (joint, decoupled) = paired_values(
        list(subject.runs.values()), lambda r: r.summary["knn/top1"]
    )
    if not seeds:
        return None
    diff = [y - x for x, y in zip(joint, decoupled, strict=True)]
    measured = (
        f"joint {stat(joint, 100)}, decoupled {stat(decoupled, 100)}, "
        f"difference {stat(diff, 100)} points"
    )
    for label, key in (("untrained", "knn/untrained"), ("raw pixels", "knn/pixels")):
        baseline = values(only_seeds(subject.runs["joint"], seeds), lambda r, k=key: r.summary[k])
        if baseline:
            measured += f"; {label} {stat(baseline, 100)}"
    return Measured(measured, not_worse_on_paired_seeds(diff), used(subject, seeds))


def long_tail(subject: Subject) -> Measured | None:
    """Claim 6: per-group accuracy of both kinds; the tail group's paired difference."""
    groups = list(subject.runs.values())
    _, (joint, decoupled) = paired_values(groups, lambda r: group_accuracy(r, "knn", TAIL_GROUP))
    if not joint:
        return None
    tail = [y - x for x, y in zip(joint, decoupled, strict=True)]
    parts = []
    for protocol in ("knn", "linear"):
        for group in LONGTAIL_GROUPS:
            _, (a, b) = paired_values(
                groups, lambda r, p=protocol, g=group: group_accuracy(r, p, g)
            )
            if a:
                parts.append(f"{protocol} {group}: joint {stat(a, 100)}, decoupled {stat(b, 100)}")
    measured = "; ".join(parts) + f"; tail difference {stat(tail, 100)} points"
    return Measured(measured, not_worse_on_paired_seeds(tail), describe_runs(*groups))


def ablation(early: bool) -> Callable[[Subject], Measured | None]:
    """Claim 7 on one ablation against full decoupled of the same seeds: (c) when ``early``
    (usage in the first steps), else (a) and (b) (unique % at the end, usage at the last
    batch)."""
    usage = usage_early if early else usage_last

    def measure(subject: Subject) -> Measured | None:
        full, runs = subject.runs["full"], subject.runs["ablation"]
        shown, diff = [], {}
        for what, get in (
            ("unique % end", unique_end),
            ("min unique %", unique_min),
            ("used early" if early else "used", usage),
        ):
            _, (a, b) = paired_values([full, runs], get)
            diff[get] = [y - x for x, y in zip(a, b, strict=True)]  # ablation − full
            if a:
                shown.append(f"{what}: full {stat(a)}, ablation {stat(b)}")
        if early:
            verdict = fewer_used_early(diff[usage]) if diff[usage] else None
        elif diff[unique_end] or diff[usage]:
            verdict = ablation_lowers(diff[unique_end], diff[usage])
        else:
            verdict = None
        if verdict is None:
            return None
        return Measured("; ".join(shown), verdict, describe_runs(only_seeds(full, runs), runs))

    return measure


def koleo(subject: Subject) -> Measured | None:
    """Claim 8: mean unique % at the end of joint, joint + KoLeo-proto and decoupled."""
    seeds, (joint, koleo, decoupled) = paired_values(list(subject.runs.values()), unique_end)
    if not seeds:
        return None
    weights = {koleo_weight(subject.runs["joint-koleo"][s]) for s in seeds} - {None}
    weight = f" (weight {', '.join(sorted(weights))})" if weights else ""
    measured = (
        f"joint {stat(joint)}, joint + KoLeo-proto{weight} {stat(koleo)}, "
        f"decoupled {stat(decoupled)}"
    )
    return Measured(measured, koleo_ordering(joint, koleo, decoupled), used(subject, seeds))
