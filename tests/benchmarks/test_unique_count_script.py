"""The unique-count benchmark's --quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import _common, unique_count
from protogmm.diagnostics import DEFAULT_EPS

ROOT = Path(__file__).resolve().parents[2]


def own_section(name: str) -> str | None:
    """This script's block of BENCHMARKS.md, or None (other scripts may write theirs
    meanwhile: only this block must stay as it was)."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    return text[text.index(begin) : text.index(end)] if begin in text and end in text else None


def test_quick_mode_times_every_set_against_the_baseline(tmp_path: Path) -> None:
    before = own_section(unique_count.SECTION)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.unique_count", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_common.package_environment(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    section = result.stdout[result.stdout.index("## Definition 2.1 count at scale") :]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| set |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines[start + 2 :]
        if line.startswith("|")
    ]
    assert [row[0] for row in rows] == list(unique_count.SETS)
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        assert cells["K"] == "2048" and cells["d"] == "64"
        counts = [int(count) for count in cells["unique at each ε"].split(" / ")]
        assert len(counts) == len(DEFAULT_EPS) and all(1 <= c <= 2048 for c in counts)
        assert float(cells["after s"]) > 0 and float(cells["before s"]) > 0
        # --quick compares with the previous algorithm (its git revision is in the history).
        assert cells["same representatives"] == "yes", row
    assert "int8 floor" in section or "int8 products unavailable" in section
    # --quick never rewrites the measured numbers.
    assert own_section(unique_count.SECTION) == before


def test_planted_set_straddles_every_eps() -> None:
    """Planted copies sit at 0.3 eps, 0.9 eps and eps (1 +- 1e-9) from their base."""
    prototypes = unique_count.planted_set(400, 32, seed=0)
    unit = torch.nn.functional.normalize(prototypes, dim=1)
    distance = 1.0 - unit @ unit.T
    for eps in DEFAULT_EPS:
        just_inside = ((distance - eps * (1 - 1e-9)).abs() < 1e-12).any()
        just_outside = ((distance - eps * (1 + 1e-9)).abs() < 1e-12).any()
        assert bool(just_inside) and bool(just_outside), eps
