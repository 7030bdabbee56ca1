"""The lightly side-by-side benchmark: --quick end to end, and lightly never a dependency."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lightly_side_by_side.py"
RUN_LABELS = (
    "lightly DINO, protogmm's recipe",
    "lightly DINO, its CIFAR-10 recipe",
    "protogmm DINO joint",
    "protogmm DINO decoupled",
)
LIGHTLY_UNAVAILABLE = 3


def own_section(name: str) -> str | None:
    """This script's block of BENCHMARKS.md, or None (other scripts may write theirs
    meanwhile: only this block must stay as it was)."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    return text[text.index(begin) : text.index(end)] if begin in text and end in text else None


def pypi_reachable() -> bool:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from lightly_side_by_side import pypi_reachable as reachable
    finally:
        sys.path.pop(0)
    return reachable()


@pytest.mark.slow
def test_quick_mode_trains_every_run_and_prints_the_section(tmp_path: Path) -> None:
    before = own_section("lightly")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-write", "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    if result.returncode == LIGHTLY_UNAVAILABLE and not pypi_reachable():
        pytest.skip(f"PyPI unreachable, lightly cannot be installed: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    section = result.stdout[result.stdout.index("## Side by side with lightly") :]
    lines = section.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = {}
    for line in lines[header_at + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    assert set(rows) == {*RUN_LABELS, "untrained encoder", "raw pixels"}
    for label in RUN_LABELS:
        row = dict(zip(header, rows[label], strict=True))
        for key in ("images/s", "s/epoch", "median s/step"):
            assert float(row[key]) > 0, row
        assert math.isfinite(float(row["peak MiB (run)"])), row
        for key in ("k-NN k=20", "k-NN k=200"):
            assert 0 < float(row[key]) <= 100, row
        unique = [
            float(v) for v in row[next(h for h in header if h.startswith("unique"))].split("/")
        ]
        assert len(unique) == 4 and all(0 < v <= 100 for v in unique), row
        assert math.isfinite(float(row["final loss"])), row
    assert rows["lightly DINO, its CIFAR-10 recipe"][1] == "2048"
    assert "- **Speed.**" in section
    profile = section[section.index("### Where a training step goes") :].splitlines()
    profile_rows = [line for line in profile if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in profile_rows[1:]] == list(RUN_LABELS)
    assert not [row for row in profile_rows if "not profiled" in row]
    # --quick never rewrites the measured numbers.
    assert own_section("lightly") == before


def test_install_failure_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """No index reachable: one line on stderr, exit 3, nothing half-installed left behind."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")
    }
    env.update(
        {
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # the discard port: refused at once
            "PIP_RETRIES": "0",
            "PIP_TIMEOUT": "2",
        }
    )
    target = tmp_path / "cache" / "lightly-1.6.0"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-write", "--lightly-dir", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == LIGHTLY_UNAVAILABLE, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith(
        "lightly_side_by_side: could not install lightly==1.6.0"
    ), result.stderr
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the staging folder was removed


def test_lightly_is_not_a_project_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    assert not [r for r in requirements if r.lower().replace("_", "-").startswith("lightly")]
