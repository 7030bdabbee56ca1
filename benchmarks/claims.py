"""Paper claims 1-8 (paper-notes §6) judged on the finished benchmark runs; trains nothing.

    scripts/dev python -m benchmarks.claims                # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.claims --no-write     # print it only
    scripts/dev python -m benchmarks.claims --list         # the claims, what they read, rules

Reads the run directories the other benchmark scripts leave behind (``summary.json`` plus
``metrics.csv``, see :func:`benchmarks._common.load_run`):

* ``benchmarks/decoupling.py`` (``--decoupling-dir``): ``joint-seed<s>``,
  ``decoupled-seed<s>`` (DINO) and the ablations, named by their label with spaces as
  underscores (``forgetting:_none-seed0``);
* ``benchmarks/longtail.py`` (``--longtail-dir``): ``{joint,decoupled}-rho<rho>-seed<s>``;
* ``benchmarks/hosts.py`` (``--hosts-dir``): ``<host>-{joint,decoupled,joint-koleo}-seed<s>``.

A directory without a readable ``summary.json`` is a run not finished (still running or
cut short) and is left out. The claims are data (:data:`CLAIMS`): each has the paper's
statement, the runs it reads (its subjects, one row each: a host, a long-tail ratio, an
ablation), what it measures there (``_claim_measures``) and the rule with its threshold
that judges the numbers (a pure function of ``_claim_rules``). One loop, :func:`evaluate`,
makes the rows: the rule, the numbers measured (mean ± std over the seeds found; comparisons
over the seeds both sides have), the verdict (``holds``, ``does not hold`` or ``not measured
(run: <command>)``) and the run directories used. The section is ``claims`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from protogmm.reports import markdown_table

from . import _claim_measures as measures
from ._claim_measures import Measured, Subject
from ._claim_rules import (
    ABLATION_LABELS,
    ABLATION_MIN_UNIQUE_DROP_POINTS,
    ABLATION_MIN_USAGE_DROP,
    ANGLE_FLAT_MAX_TV,
    CLAIM_EPS,
    COLLAPSE_MIN_DROP_POINTS,
    DECOUPLED_MIN_UNIQUE,
    EARLY_FRACTION_OF_STEPS,
    EARLY_MIN_SHARE_OF_DROP,
    JOINT_COLLAPSE_MAX_UNIQUE,
    OTHER_EPS,
    TAIL_GROUP,
    combine_either,
)
from ._claim_runs import DEFAULT_DIRS, Sources, display_path, load_sources
from ._common import command_line, replace_section


@dataclass(frozen=True)
class Claim:
    """One claim of paper-notes §6, as the loop of :func:`evaluate` judges it.

    Attributes:
        id: its number ("1", "7a").
        title: the rows' name after the number.
        statement: what the paper claims (paper-notes §6).
        reads: which benchmark runs it reads.
        rule: the rule with its threshold, as the table prints it.
        subjects: its subjects in the runs, one row each.
        measure: a subject's numbers and the rule's verdict, or None when its runs are
            missing (the row then says how to make them).
        merge_command: where set, the subjects not measured that have a ``merge_key`` share
            one row after the others, whose verdict runs this script and arguments followed
            by their keys.
        combines: the ids of earlier claims this one holds with when any of them holds;
            ``merge_command`` then makes the runs they miss.
    """

    id: str
    title: str
    statement: str
    reads: str
    rule: str
    subjects: Callable[[Sources], list[Subject]] = lambda sources: []
    measure: Callable[[Subject], Measured | None] = lambda subject: None
    merge_command: tuple[str, ...] | None = None
    combines: tuple[str, ...] = ()

    def name(self, label: str | None = None) -> str:
        """The row's claim cell: ``<id> <title>``, then `` (<label>)`` if given."""
        return f"{self.id} {self.title}" + (f" ({label})" if label else "")


HOST_RUNS = "joint and decoupled runs of decoupling.py (DINO, and its longer horizon) and hosts.py"
ABLATION_RUNS = "decoupling.py's ablation runs beside its full decoupled runs of the same seeds"


def forgetting_rule(label: str) -> str:
    """The rule of claims 7 (a) and (b) for the ablation ``label``."""
    return (
        f"'{label}': unique % (ε = {CLAIM_EPS}, end) < full decoupled's − "
        f"{ABLATION_MIN_UNIQUE_DROP_POINTS:g} points, or prototypes used (argmax, last "
        f"batch) < full decoupled's − {ABLATION_MIN_USAGE_DROP:g} (paired seeds)"
    )


#: The claims, in the table's order (claim 9, overhead, is the head-cost section's).
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "1",
        "partial collapse",
        "joint training collapses partially: well below 100 % unique at ε = 0.025 (~50 %)",
        HOST_RUNS,
        f"joint's unique % at ε = {CLAIM_EPS} (end) < {JOINT_COLLAPSE_MAX_UNIQUE:g}",
        measures.hosts_with(),
        measures.partial_collapse,
        merge_command=("hosts", "--hosts"),
    ),
    Claim(
        "2",
        "collapse is early",
        "most of joint's drop happens in the first ~10 % of training",
        HOST_RUNS,
        f"if joint's unique % (ε = {CLAIM_EPS}) drops (first − last > "
        f"{COLLAPSE_MIN_DROP_POINTS:g} points), ≥ {EARLY_MIN_SHARE_OF_DROP:.0%} of the drop "
        f"by {EARLY_FRACTION_OF_STEPS:.0%} of the steps",
        measures.hosts_with("joint"),
        measures.collapse_timing,
    ),
    Claim(
        "3",
        "no collapse when decoupled",
        "decoupled keeps ≥ 99 % unique at ε = 0.025 throughout training, ~100 % up to ε = 0.5",
        HOST_RUNS,
        f"decoupled's unique % (ε = {CLAIM_EPS}) ≥ {DECOUPLED_MIN_UNIQUE:g} at every logged "
        f"step of every seed; ε = {' / '.join(OTHER_EPS)} at the end shown",
        measures.hosts_with("decoupled"),
        measures.decoupled_minimum,
    ),
    Claim(
        "4",
        "flat angle density",
        "the PCA-2 angle density is ~flat for decoupled, multi-modal for joint (Fig. 1)",
        HOST_RUNS,
        f"angle density TV to uniform (0 = flat): decoupled ≤ {ANGLE_FLAT_MAX_TV:g} < joint "
        "(means over paired seeds)",
        measures.hosts_with("joint", "decoupled"),
        measures.angle_flatness,
    ),
    Claim(
        "5",
        "k-NN parity or gain",
        "k-NN (k = 20) of decoupled ≥ joint; a gain only if it exceeds the seed std",
        HOST_RUNS,
        "k-NN top-1 (k = 20): mean paired (decoupled − joint) ≥ 0; 'gain' only if it "
        "exceeds the std of the paired differences",
        measures.hosts_with("joint", "decoupled"),
        measures.knn,
    ),
    Claim(
        "6",
        "long tail",
        "on long-tailed data decoupled ≥ joint on the tail classes' k-NN accuracy",
        "joint and decoupled runs of longtail.py, per imbalance ratio",
        f"k-NN top-1 on the '{TAIL_GROUP}' (tail) group: mean paired (decoupled − joint) ≥ 0",
        measures.longtail_ratios,
        measures.long_tail,
    ),
    Claim(
        "7a",
        f"ablation: {ABLATION_LABELS['7a']}",
        "without forgetting (λ = 1) dead or duplicate components appear",
        ABLATION_RUNS,
        forgetting_rule(ABLATION_LABELS["7a"]),
        measures.ablation_runs(ABLATION_LABELS["7a"]),
        measures.ablation(early=False),
    ),
    Claim(
        "7b",
        f"ablation: {ABLATION_LABELS['7b']}",
        "with time-only forgetting rarely used components decay, so unique % or usage drops",
        ABLATION_RUNS,
        forgetting_rule(ABLATION_LABELS["7b"]),
        measures.ablation_runs(ABLATION_LABELS["7b"]),
        measures.ablation(early=False),
    ),
    Claim(
        "7c",
        f"ablation: {ABLATION_LABELS['7c']}",
        "without annealing (β ≡ 1) fewer components are used early",
        ABLATION_RUNS,
        f"'{ABLATION_LABELS['7c']}': mean prototypes used (argmax) in the first "
        f"{EARLY_FRACTION_OF_STEPS:.0%} of steps < full decoupled's − "
        f"{ABLATION_MIN_USAGE_DROP:g} (paired seeds)",
        measures.ablation_runs(ABLATION_LABELS["7c"]),
        measures.ablation(early=True),
    ),
    Claim(
        "7",
        "forgetting matters ((a) or (b))",
        "forgetting prevents collapse: (a) or (b) lowers uniqueness or usage",
        "the rows of 7a and 7b",
        "7a or 7b holds",
        merge_command=("decoupling", "--reuse", "--ablations"),
        combines=("7a", "7b"),
    ),
    Claim(
        "8",
        "KoLeo-proto ordering",
        "uniqueness orders joint < joint + KoLeo-proto < decoupled",
        "hosts.py's joint, joint + KoLeo-proto and decoupled runs, per host",
        f"unique % (ε = {CLAIM_EPS}, end): joint < joint + KoLeo-proto < decoupled (means)",
        measures.koleo_hosts,
        measures.koleo,
    ),
)


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


def evaluate(sources: Sources, claims: Sequence[Claim] = CLAIMS) -> list[ClaimRow]:
    """Every claim's rows, in order: one per subject, measured or "not measured".

    A subject not measured gets a row with ``–`` and its command, unless its claim merges
    such subjects into one row (claim 1: one ``--hosts`` command for the missing hosts). A
    combining claim (7) holds when a claim it combines holds; when none holds and one is
    not measured, its command makes every missing run at once.
    """
    rows: list[ClaimRow] = []
    verdicts: dict[str, list[str]] = {}  # claim id -> its rows' verdicts
    unmeasured: dict[str, list[Subject]] = {}  # claim id -> its subjects not measured
    for claim in claims:
        own: list[ClaimRow] = []
        unmeasured[claim.id] = []
        if claim.combines:
            verdict = combine_either([v for part in claim.combines for v in verdicts[part]])
            if verdict.startswith("not measured") and claim.merge_command:
                keys = [s.merge_key or "" for part in claim.combines for s in unmeasured[part]]
                verdict = sources.not_measured(*claim.merge_command, *keys)
            measured = f"see {', '.join(claim.combines)}"
            own.append(ClaimRow(claim.name(), claim.rule, measured, verdict))
        for subject in claim.subjects(sources):
            result = claim.measure(subject)
            name = claim.name(subject.label)
            if result is not None:
                own.append(ClaimRow(name, claim.rule, result.measured, result.verdict, result.runs))
                continue
            unmeasured[claim.id].append(subject)
            if not (claim.merge_command and subject.merge_key):
                own.append(ClaimRow(name, claim.rule, "–", subject.missing, subject.missing_runs))
        merged = [s for s in unmeasured[claim.id] if s.merge_key]
        if merged and claim.merge_command:  # one row, after the claim's other rows
            label = ", ".join(str(s.label) for s in merged)
            keys = [s.merge_key or "" for s in merged]
            command = sources.not_measured(*claim.merge_command, *keys)
            own.append(ClaimRow(claim.name(label), claim.rule, "–", command))
        verdicts[claim.id] = [row.verdict for row in own]
        rows += own
    return rows


def build_section(
    decoupling_dir: Path,
    longtail_dir: Path,
    hosts_dir: Path,
    decoupling_long_dir: Path | None = None,
) -> str:
    """The Markdown of the "claims" section from whatever runs are finished."""
    sources = load_sources(decoupling_dir, longtail_dir, hosts_dir, decoupling_long_dir)
    rows = evaluate(sources)
    unfinished = [
        f"{display_path(f.directory)}/{name}" for f in sources.folders() for name in f.unfinished
    ]
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
            markdown_table(HEADER, [row.cells() for row in rows]),
        ]
    )


def list_claims(claims: Sequence[Claim] = CLAIMS) -> str:
    """Each claim's statement, the runs it reads and its rule, one paragraph each."""
    return "\n\n".join(
        f"{c.id} {c.title}: {c.statement}.\n  reads: {c.reads}\n  rule: {c.rule}" for c in claims
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
    parser.add_argument(
        "--list", action="store_true", help="print the claims (statement, runs, rule) and exit"
    )
    args = parser.parse_args(argv)
    if args.list:
        print(list_claims())
        return 0
    section = build_section(
        args.decoupling_dir, args.longtail_dir, args.hosts_dir, args.decoupling_long_dir
    )
    print(section, flush=True)
    if not args.no_write and not args.quick:
        replace_section("claims", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
