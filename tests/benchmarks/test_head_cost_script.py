"""The head-cost benchmark's --quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import _common, _head_cost_measures, head_cost
from helpers import benchmarks_section, run_benchmark


def table_rows(section: str, first_header_cell: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the first Markdown table whose header starts so."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*") for cell in line.strip("|").split("|")])
    return header, rows


def number(cell: str) -> float:
    """The leading number of a cell such as ``12.3`` or ``4.5 (7)``."""
    return float(cell.split()[0])


@pytest.mark.slow
def test_quick_mode_prints_the_head_cost_section(tmp_path: Path) -> None:
    before = benchmarks_section("head-cost")
    out = run_benchmark("head_cost", "--quick", "--no-write", cwd=tmp_path, timeout=900)
    section = out[out.index("## Head cost vs K") :]

    header, rows = table_rows(section, "K")
    assert "time decoupled/joint" in header and "floor: 1 product ms" in header
    # --quick: K = 256 and 1024 with no local views, and 1024 with 2 local views.
    assert [(row[0], row[1]) for row in rows] == [("256", "0"), ("1024", "0"), ("1024", "2")]
    for row in rows:
        assert len(row) == len(header)
        values = [number(cell) for cell in row[2:]]
        assert all(math.isfinite(v) for v in values), row
        times = [number(row[header.index(name)]) for name in header if name.endswith("ms/step")]
        assert all(t > 0 for t in times), row
        assert number(row[header.index("floor: 1 product ms")]) > 0, row
        for name in ("joint peak MiB", "decoupled peak MiB"):
            assert number(row[header.index(name)]) >= 0, row

    unique_part = section[section.index("### Definition 2.1 count") :]
    _, unique_rows = table_rows(unique_part, "K")
    assert [row[0] for row in unique_rows] == ["256", "1024"]
    for row in unique_rows:
        joint_count, gmm_count = int(row[1]), int(row[4])
        assert 1 <= joint_count <= int(row[0]) and 1 <= gmm_count <= int(row[0])
        assert float(row[2]) >= 0 and float(row[5]) >= 0

    profile_part = section[section.index("### Where a step's time goes") :]
    _, phase_rows = table_rows(profile_part, "head")
    assert {row[1] for row in phase_rows if row[0] == "decoupled"} >= {
        "GMM update (E-step, statistics, M-step)",
        "backward",
    }
    assert {row[1] for row in phase_rows if row[0] == "joint"} >= {"AdamW step", "EMA update"}
    operator_part = profile_part[profile_part.index("| head | operator |") :]
    _, operator_rows = table_rows(operator_part, "head")
    # Both heads and every variant are profiled.
    assert {row[0] for row in operator_rows} == {"joint", "decoupled", *head_cost.VARIANTS}
    assert all(float(row[2]) >= 0 for row in phase_rows + operator_rows)
    variants_part = section[section.index("### Other settings of the decoupled head") :]
    variants_header, variant_rows = table_rows(variants_part, "K")
    # Every variant at every (K, L) of the main table, with a finite positive time.
    assert [(row[0], row[1], row[2]) for row in variant_rows] == [
        (k, views, variant)
        for k, views in (("256", "0"), ("1024", "0"), ("1024", "2"))
        for variant in head_cost.VARIANTS
    ]
    for row in variant_rows:
        assert number(row[variants_header.index("ms/step")]) > 0, row
        assert number(row[variants_header.index("time variant / default decoupled")]) > 0, row
        assert number(row[variants_header.index("peak MiB")]) >= 0, row
    # --quick never rewrites the measured numbers.
    assert benchmarks_section("head-cost") == before


def test_product_counts_and_break_even(monkeypatch: pytest.MonkeyPatch) -> None:
    two_views = head_cost.Setting(1024, 256, 256, 0, "cpu")
    dino = head_cost.Setting(1024, 256, 256, 8, "cpu")
    # Truncated EM (the default): teacher scores + student scores, dz; joint: + dW.
    assert not head_cost.DENSE_DEFAULT
    assert (two_views.products("joint"), two_views.products("decoupled")) == (4, 3)
    assert dino.products("decoupled") < dino.products("joint")
    # The dense update adds the E-step (2) and the statistics (2): even at L = 6.
    monkeypatch.setattr(_head_cost_measures, "DENSE_DEFAULT", True)
    assert (two_views.products("joint"), two_views.products("decoupled")) == (4, 7)
    even = head_cost.Setting(1024, 256, 256, head_cost.BREAK_EVEN_LOCAL_VIEWS, "cpu")
    assert even.products("joint") == even.products("decoupled")
    assert dino.products("decoupled") < dino.products("joint")


def test_peak_memory_sees_a_freed_allocation_inside_its_block() -> None:
    with _common.PeakMemory("cpu") as memory:
        block = b"\x01" * (256 * 2**20)  # every byte written, so every page resident
        del block
    assert memory.peak_mib >= memory.start_mib
    if memory.exact:  # Linux: the high-water mark was reset at the start of the block
        assert memory.increase_mib > 200
