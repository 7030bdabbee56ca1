"""benchmarks.claims: its verdict rules on hand-made numbers, the claims as data, and the
section end to end on fake run directories (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _claim_rules as rules
from benchmarks import _claim_runs, claims
from helpers import REPO_ROOT, run_benchmark

HOLDS, FAILS = "holds", "does not hold"


# --- The rules ---------------------------------------------------------------------------


def test_joint_collapse_needs_the_mean_below_the_threshold() -> None:
    assert rules.JOINT_COLLAPSE_MAX_UNIQUE == 50.0
    assert rules.joint_collapses([20.0, 30.0]) == HOLDS
    assert rules.joint_collapses([40.0, 60.0]) == FAILS  # mean 50 is not below 50
    assert rules.joint_collapses([100.0]) == FAILS


def test_early_share_of_the_drop_is_read_at_ten_percent_of_the_steps() -> None:
    steps = [0.0, 5.0, 10.0, 50.0, 100.0]
    early_collapse = rules.drop_and_early_share(steps, [100, 30, 20, 20, 20], 100)
    late_collapse = rules.drop_and_early_share(steps, [100, 100, 100, 50, 20], 100)
    no_drop = rules.drop_and_early_share(steps, [100, 100, 100, 100, 100], 100)
    assert early_collapse == (80, 1.0)
    assert late_collapse == (80, 0.0)
    assert no_drop == (0, None)


def test_collapse_is_early_when_most_of_the_drop_comes_first() -> None:
    assert rules.collapse_is_early([80.0, 60.0], [1.0, 0.6]) == HOLDS
    assert rules.collapse_is_early([80.0, 60.0], [0.2, 0.3]) == FAILS
    assert rules.collapse_is_early([80.0, 0.0], [0.9, None]) == HOLDS
    assert rules.collapse_is_early([0.0, 0.0], [None, None]) == f"{FAILS} (no collapse to time)"


def test_decoupled_must_stay_above_the_threshold_at_every_seed() -> None:
    assert rules.decoupled_never_collapses([99.0, 100.0]) == HOLDS
    assert rules.decoupled_never_collapses([98.9, 100.0]) == FAILS


def test_angle_density_is_judged_by_total_variation_lower_is_flatter() -> None:
    assert rules.angles_flat_only_when_decoupled([0.6, 0.7], [0.05, 0.07]) == HOLDS
    assert rules.angles_flat_only_when_decoupled([0.08], [0.07]) == FAILS  # both flat
    assert rules.angles_flat_only_when_decoupled([0.6], [0.3]) == FAILS  # neither flat


def test_knn_gain_only_beyond_the_std_of_the_paired_differences() -> None:
    assert rules.not_worse_on_paired_seeds([0.010, 0.012]) == "holds (gain)"
    assert rules.not_worse_on_paired_seeds([0.02, -0.01]) == "holds (parity)"
    assert rules.not_worse_on_paired_seeds([0.03]) == "holds (parity)"  # no std of one
    assert rules.not_worse_on_paired_seeds([0.0, 0.0]) == "holds (parity)"
    assert rules.not_worse_on_paired_seeds([-0.01, -0.02]) == FAILS


def test_ablation_lowers_uniqueness_or_usage() -> None:
    assert rules.ablation_lowers([0.0], [-30.0]) == HOLDS
    assert rules.ablation_lowers([-1.5], []) == HOLDS
    assert rules.ablation_lowers([0.0], [2.0]) == FAILS
    # Within the noise floors (1 point of unique %, 20 prototypes of usage): no effect.
    assert rules.ablation_lowers([-0.2], [-10.0]) == FAILS
    assert rules.fewer_used_early([-30.0, -24.0]) == HOLDS
    assert rules.fewer_used_early([-10.0, -4.0]) == FAILS
    assert rules.fewer_used_early([5.0]) == FAILS


def test_koleo_ordering_is_strict() -> None:
    assert rules.koleo_ordering([10.0], [30.0], [100.0]) == HOLDS
    assert rules.koleo_ordering([10.0], [10.0], [100.0]) == FAILS
    assert rules.koleo_ordering([100.0], [100.0], [100.0]) == FAILS


def test_claim_seven_holds_if_either_forgetting_ablation_holds() -> None:
    not_measured = "not measured (run: `x`)"
    assert rules.combine_either([FAILS, HOLDS]) == HOLDS
    assert rules.combine_either([FAILS, not_measured]) == not_measured
    assert rules.combine_either([FAILS, FAILS]) == FAILS


def test_run_directory_names_match_the_scripts_that_write_them() -> None:
    """The names claims.py looks for are the ones the other scripts write."""
    decoupling = (REPO_ROOT / "benchmarks" / "decoupling.py").read_text()
    assert "f\"{label.replace(' ', '_')}-seed{seed}\"" in decoupling
    for label in rules.ABLATION_LABELS.values():
        assert f'"{label}":' in decoupling
    assert (
        'f"{kind}-rho{args.rho:g}-seed{seed}"'
        in (REPO_ROOT / "benchmarks" / "longtail.py").read_text()
    )
    hosts = (REPO_ROOT / "benchmarks" / "hosts.py").read_text()
    assert 'f"{host}-{slug(label)}-seed{seed}"' in hosts
    assert '"joint-koleo"' in hosts


# --- The claims as data ------------------------------------------------------------------


def test_claims_are_data_in_table_order_with_their_statement_runs_and_rule() -> None:
    ids = [claim.id for claim in claims.CLAIMS]
    assert ids == ["1", "2", "3", "4", "5", "6", "7a", "7b", "7c", "7", "8"]
    for index, claim in enumerate(claims.CLAIMS):
        assert claim.statement and claim.reads and claim.rule, claim.id
        # A combining claim reads the rows of claims before it.
        assert set(claim.combines) <= set(ids[:index]), claim.id
    assert [claims.CLAIMS[ids.index(part)].title for part in ("7a", "7b", "7c")] == [
        f"ablation: {label}" for label in rules.ABLATION_LABELS.values()
    ]


def test_list_prints_every_claim_with_what_it_reads_and_its_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert claims.main(["--list"]) == 0
    printed = capsys.readouterr().out
    for claim in claims.CLAIMS:
        assert f"{claim.id} {claim.title}: {claim.statement}." in printed
        assert f"  rule: {claim.rule}" in printed


# --- End to end on fake runs -------------------------------------------------------------


def write_run(
    folder: Path, name: str, summary: dict[str, Any], rows: list[dict[str, float]]
) -> None:
    """A finished run directory: summary.json and a metrics.csv with the logged columns."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    columns = sorted({key for row in rows for key in row})
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def history(unique_pct: list[float], used: list[float]) -> list[dict[str, float]]:
    """metrics.csv rows at steps 0, 5, ..., 100 of 100 (dense early, like the monitor)."""
    steps = [0, 5, 10, 25, 50, 75, 100]
    return [
        {"step": s, _claim_runs.UNIQUE_COLUMN: u, _claim_runs.USAGE_COLUMN: n}
        for s, u, n in zip(steps, unique_pct, used, strict=True)
    ]


def summary(unique_end: float, knn: float, flatness: float) -> dict[str, Any]:
    return {
        "epochs": 5,
        "steps": 100,
        "knn/top1": knn,
        "knn/untrained": 0.8,
        "knn/pixels": 0.95,
        "unique_pct": {"0.025": unique_end, "0.1": unique_end, "0.25": unique_end, "0.5": 5.0},
        "angle_flatness": flatness,
    }


def verdicts(section: str) -> dict[str, str]:
    """Claim cell -> verdict cell of the claims table."""
    found = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(claims.HEADER):
            found[cells[0]] = cells[3]
    return found


def own_section() -> str | None:
    text = (REPO_ROOT / "BENCHMARKS.md").read_text()
    begin, end = "<!-- BEGIN claims -->", "<!-- END claims -->"
    return text[text.index(begin) : text.index(end)] if begin in text and end in text else None


def test_section_judges_the_runs_it_finds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decoupling = tmp_path / "decoupling"
    for seed, knn_gap in ((0, 0.04), (1, 0.06)):
        # Joint collapses to 20 % within the first 10 steps; decoupled stays at 100 % but
        # is worse on k-NN.
        write_run(
            decoupling,
            f"joint-seed{seed}",
            summary(20.0, 0.9, 0.6),
            history([100, 40, 20, 20, 20, 20, 20], [100, 60, 50, 50, 50, 50, 50]),
        )
        write_run(
            decoupling,
            f"decoupled-seed{seed}",
            summary(100.0, 0.9 - knn_gap, 0.05),
            history([100] * 7, [120] * 7),
        )
    write_run(
        decoupling,
        "forgetting:_none-seed0",
        summary(90.0, 0.85, 0.1),
        history([100, 100, 95, 90, 90, 90, 90], [120] * 7),
    )
    (decoupling / "joint-seed2").mkdir()  # still running: no summary.json yet
    (decoupling / "joint-seed2" / "metrics.csv").write_text("step\n0\n")
    before = own_section()

    assert (
        claims.main(
            [
                "--quick",
                "--decoupling-dir",
                str(decoupling),
                "--longtail-dir",
                str(tmp_path / "longtail"),
                "--hosts-dir",
                str(tmp_path / "hosts"),
                "--decoupling-long-dir",
                str(tmp_path / "decoupling-long"),
            ]
        )
        == 0
    )
    section = capsys.readouterr().out
    verdict = verdicts(section)

    assert verdict["1 partial collapse (DINO)"] == HOLDS
    assert verdict["2 collapse is early (DINO)"] == HOLDS
    assert verdict["3 no collapse when decoupled (DINO)"] == HOLDS
    assert verdict["4 flat angle density (DINO)"] == HOLDS
    assert verdict["5 k-NN parity or gain (DINO)"] == FAILS
    assert verdict["6 long tail"] == (
        f"not measured (run: `scripts/dev python -m benchmarks.longtail --out "
        f"{tmp_path / 'longtail'}`)"
    )
    assert verdict["1 partial collapse (iBOT, CARP)"].startswith(
        "not measured (run: `scripts/dev python -m benchmarks.hosts --hosts ibot carp"
    )
    assert verdict["7a ablation: forgetting: none"] == HOLDS
    assert verdict["7b ablation: forgetting: time"].startswith("not measured (run: ")
    assert verdict["7 forgetting matters ((a) or (b))"] == HOLDS
    assert verdict["8 KoLeo-proto ordering"].startswith("not measured (run: ")
    # Numbers are mean ± std with the seed count; the rows name the runs they used.
    assert "joint 20.0 ± 0.0 (2 seeds)" in section
    assert "joint-seed{0,1}, decoupled-seed{0,1}" in section
    assert "joint-seed2" in section  # listed as not finished, and left out
    assert own_section() == before  # --quick never writes BENCHMARKS.md


def longtail_summary(knn_few: float, knn_many: float) -> dict[str, Any]:
    """A longtail.py run's summary: per-group k-NN and linear accuracy of the trained encoder."""
    groups = {"many": knn_many, "medium": 0.8, "few": knn_few, "all": 0.8}
    return {
        "epochs": 15,
        "steps": 100,
        "unique_pct": {"0.025": 100.0},
        "longtail": {"results": {"trained": {"knn": groups, "linear": groups}}},
    }


def test_long_tail_and_koleo_rows_come_from_their_own_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    longtail, hosts = tmp_path / "longtail", tmp_path / "hosts"
    for seed in (0, 1):
        flat = history([100] * 7, [100] * 7)
        write_run(longtail, f"joint-rho10-seed{seed}", longtail_summary(0.50, 0.95), flat)
        write_run(longtail, f"decoupled-rho10-seed{seed}", longtail_summary(0.55, 0.93), flat)
        for slug, unique in (("joint", 10.0), ("joint-koleo", 30.0), ("decoupled", 100.0)):
            write_run(hosts, f"dino-{slug}-seed{seed}", summary(unique, 0.9, 0.1), flat)
            write_run(hosts, f"carp-{slug}-seed{seed}", summary(100.0, 0.9, 0.1), flat)
        (hosts / f"dino-joint-koleo-seed{seed}" / "hparams.yaml").write_text(
            "prototypes: joint\nkoleo_weight: 0.1\n"
        )
    write_run(hosts, "ibot-joint-seed0", summary(5.0, 0.9, 0.5), flat)

    claims.main(
        [
            "--quick",
            "--decoupling-dir",
            str(tmp_path / "decoupling"),
            "--longtail-dir",
            str(longtail),
            "--hosts-dir",
            str(hosts),
            "--decoupling-long-dir",
            str(tmp_path / "decoupling-long"),
        ]
    )
    section = capsys.readouterr().out
    verdict = verdicts(section)

    assert verdict["6 long tail (rho = 10)"] == "holds (gain)"  # +5 points on every seed
    assert "knn few: joint 50.0 ± 0.0 (2 seeds), decoupled 55.0 ± 0.0 (2 seeds)" in section
    assert verdict["8 KoLeo-proto ordering (DINO)"] == HOLDS
    assert "joint + KoLeo-proto (weight 0.1) 30.0 ± 0.0 (2 seeds)" in section
    assert verdict["8 KoLeo-proto ordering (CARP)"] == FAILS  # all at 100 %
    assert verdict["8 KoLeo-proto ordering (iBOT)"].startswith(
        "not measured (run: `scripts/dev python -m benchmarks.hosts --hosts ibot --out "
    )
    assert verdict["1 partial collapse (iBOT)"] == HOLDS
    assert verdict["1 partial collapse (CARP)"] == FAILS
    assert verdict["1 partial collapse (DINO)"].startswith(
        "not measured (run: `scripts/dev python -m benchmarks.decoupling --out "
    )


def test_the_longer_horizon_gets_its_own_rows_only_where_both_kinds_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_dir = tmp_path / "decoupling-long"
    flat = history([100] * 7, [100] * 7)
    write_run(long_dir, "joint-seed0", summary(100.0, 0.92, 0.1), flat)
    arguments = ["--quick", "--decoupling-dir", str(tmp_path / "decoupling")]
    arguments += ["--longtail-dir", str(tmp_path / "longtail")]
    arguments += ["--hosts-dir", str(tmp_path / "hosts")]
    arguments += ["--decoupling-long-dir", str(long_dir)]

    claims.main(arguments)  # joint alone: no row for the longer horizon
    rows = verdicts(capsys.readouterr().out)
    assert not [claim for claim in rows if "steps)" in claim]

    for seed, (joint, decoupled) in enumerate(((0.92, 0.95), (0.94, 0.95))):
        if seed:
            write_run(long_dir, f"joint-seed{seed}", summary(100.0, joint, 0.1), flat)
        below = history([94] * 7, [100] * 7)
        write_run(long_dir, f"decoupled-seed{seed}", summary(94.0, decoupled, 0.1), below)
    claims.main(arguments)
    section = capsys.readouterr().out
    verdict = verdicts(section)
    host = "DINO, 100 steps"  # named by the runs' own step count
    assert verdict[f"5 k-NN parity or gain ({host})"] == "holds (gain)"  # +3 and +1
    assert "difference 2.0 ± 1.4 (2 seeds) points" in section
    assert verdict[f"1 partial collapse ({host})"] == FAILS  # joint stays at 100 %
    assert verdict[f"3 no collapse when decoupled ({host})"] == FAILS  # 94 % < 99 %


def test_a_longer_horizon_without_unique_counts_is_a_row_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its joint runs finished but lack unique %: claim 1 names it "not measured" with the
    command that remakes it (this once raised a KeyError)."""
    long_dir = tmp_path / "decoupling-long"
    flat = history([100] * 7, [100] * 7)
    for kind in ("joint", "decoupled"):
        without = {k: v for k, v in summary(100.0, 0.9, 0.1).items() if k != "unique_pct"}
        write_run(long_dir, f"{kind}-seed0", without, flat)
    arguments = ["--quick", "--decoupling-dir", str(tmp_path / "decoupling")]
    arguments += ["--longtail-dir", str(tmp_path / "longtail")]
    arguments += ["--hosts-dir", str(tmp_path / "hosts")]
    arguments += ["--decoupling-long-dir", str(long_dir)]

    assert claims.main(arguments) == 0
    verdict = verdicts(capsys.readouterr().out)
    assert verdict["1 partial collapse (DINO, 100 steps)"].startswith(
        "scripts/dev python -m benchmarks.decoupling --reuse --epochs 16 "
    )
    assert verdict["1 partial collapse (iBOT, CARP)"].startswith("not measured (run: ")


def test_runs_as_a_module_and_records_that_command(tmp_path: Path) -> None:
    """``python -m benchmarks.claims`` from another folder (the package on PYTHONPATH): the
    section's command line is the ``-m`` form."""
    arguments = ["--quick", "--decoupling-dir", str(tmp_path), "--longtail-dir", str(tmp_path)]
    arguments += ["--hosts-dir", str(tmp_path), "--decoupling-long-dir", str(tmp_path)]
    out = run_benchmark("claims", *arguments, cwd=tmp_path, timeout=300)
    assert (
        f"Command: `scripts/dev python -m benchmarks.claims --quick --decoupling-dir {tmp_path}"
        in out
    )
