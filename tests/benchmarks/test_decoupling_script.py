"""The decoupling benchmark's --quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_mode_trains_every_main_config_and_prints_the_section(tmp_path: Path) -> None:
    before = (ROOT / "BENCHMARKS.md").read_text()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "decoupling.py"),
            "--quick",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "runs"),
            "--plot",
            str(tmp_path / "collapse.png"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    section = result.stdout[result.stdout.index("## Decoupling at small scale") :]
    for label in ("| joint |", "| decoupled |", "| untrained encoder |", "| raw pixels |"):
        assert label in section
    assert "| posterior targets |" in section  # the --quick ablation
    assert "at batch 64, K = 1024" in section and "batch 64, 2 global" in section
    assert (tmp_path / "collapse.png").stat().st_size > 0
    assert (tmp_path / "runs" / "joint-seed0" / "summary.json").exists()
    # --quick never rewrites the measured numbers.
    assert (ROOT / "BENCHMARKS.md").read_text() == before


def test_replace_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import replace_section
    finally:
        sys.path.pop(0)
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\nintro\n")
    replace_section("a", "first A", path)
    replace_section("b", "only B", path)
    replace_section("a", "second A", path)
    text = path.read_text()
    assert text == (
        "# Benchmarks\n\nintro\n\n<!-- BEGIN a -->\nsecond A\n<!-- END a -->\n\n"
        "<!-- BEGIN b -->\nonly B\n<!-- END b -->\n"
    )
