"""benchmarks/longtail.py --quick runs end to end, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_mode_prints_every_table_and_leaves_benchmarks_md(tmp_path: Path) -> None:
    before = (ROOT / "BENCHMARKS.md").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.longtail", "--quick"]
        + ["--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=1800,  # ~6 minutes on 2 busy cores: 2 runs, each with 9 linear probes
        cwd=tmp_path,
        env=_common.package_environment(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    section = result.stdout[result.stdout.index("## Long tail") :]
    # rho = 10 over MNIST-5k's 400 per class; log-thirds: many > 185.7, few < 86.2.
    assert "400, 309, 239, 185, 143, 111, 86, 66, 51, 40; 1630 images" in section
    assert "many: 0 (400), 1 (309), 2 (239); medium: 3 (185), 4 (143), 5 (111)" in section
    for row in ("| untrained encoder |", "| raw pixels |"):
        assert section.count(row) == 2  # k-NN and linear tables
    for row in ("| joint |", "| decoupled |"):
        assert section.count(row) == 6  # k-NN, linear, 3 diversity rows, unique prototypes
    assert "| joint | distinct (of K = 1024) |" in section
    assert "| decoupled | per 100 images |" in section
    header = "| prototypes | unique % ε=0.025 | unique % ε=0.1 | unique % ε=0.25 | unique % ε=0.5 |"
    assert header in section
    assert (tmp_path / "runs" / "decoupled-rho10-seed0" / "class_counts.json").exists()
    assert (ROOT / "BENCHMARKS.md").read_text() == before  # --quick never writes


def test_model_overrides_must_not_choose_the_prototypes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.longtail", "--quick"]
        + ["--model", '{"prototypes": "joint"}'],
        capture_output=True,
        text=True,
        timeout=300,
        env=_common.package_environment(),
    )
    assert result.returncode == 2 and "--model must be a JSON object" in result.stderr
