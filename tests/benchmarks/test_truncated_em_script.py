"""The truncated-EM benchmark's --quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import benchmarks_section, run_benchmark


@pytest.mark.slow
def test_quick_mode_prints_both_tables(tmp_path: Path) -> None:
    before = benchmarks_section("truncated-em")
    out = run_benchmark("truncated_em", "--quick", "--no-write", cwd=tmp_path, timeout=600)
    section = out[out.index("## Truncated EM") :]
    cost = [line for line in section.splitlines() if line.startswith("| 1024 |")]
    assert [line.split("|")[2].strip() for line in cost] == ["64", "128"]
    for line in cost:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        assert all(float(cell) > -1 for cell in cells[2:]), line
    quality = [line for line in section.splitlines() if line.startswith("| top_k=4 |")]
    assert len(quality) == 1 and quality[0].count("/") == 4
    assert benchmarks_section("truncated-em") == before
