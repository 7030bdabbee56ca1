"""The issue-16 benchmark scripts run end to end in --quick mode and never touch BENCHMARKS.md
there; the derived data sets are the embedded images transformed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import derived_datasets
from protogmm.data.datasets import EmbeddedMNIST

ROOT = Path(__file__).resolve().parents[2]


def run_quick(module: str, *extra: str) -> str:
    """``python -m benchmarks.<module> --quick`` from the repository root: its output."""
    before = (ROOT / "BENCHMARKS.md").read_text()
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (ROOT / "BENCHMARKS.md").read_text() == before
    return result.stdout


def table_body(output: str, header_start: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_mixture_recovery_quick_reports_both_rows() -> None:
    rows = table_body(run_quick("mixture_recovery"), "| mixture |")
    assert [row[0] for row in rows] == ["defaults", "before issue 16: plain annealed online EM"]
    # defaults: every seed never collapsed and recovered every centre (2 of 2) in each column
    assert all(cell.startswith("2 / 2") for cell in rows[0][1:]), rows[0]


def test_joint_levers_quick_reports_a_joint_and_a_decoupled_row() -> None:
    rows = table_body(run_quick("joint_levers"), "| levers |")
    assert rows[0][0].startswith("joint") and rows[1][0].startswith("decoupled")
    for row in rows:
        early, end = (float(part.split()[0]) for part in row[1].split(" / "))
        assert 0.0 < early <= 100.0 and 0.0 < end <= 100.0


def test_data_sets_quick_trains_the_three_kinds(tmp_path: Path) -> None:
    output = run_quick("data_sets", "--out", str(tmp_path / "runs"))
    rows = table_body(output, "| data set |")
    kinds = [row[1] for row in rows]
    assert kinds[:3] == ["joint", "decoupled", "decoupled, plain annealed EM (before issue 16)"]
    assert {"untrained encoder", "raw pixels"} <= set(kinds)


def test_data_sets_quick_trains_truncated_em_beside_dense(tmp_path: Path) -> None:
    """``--kinds decoupled-dense decoupled-topk8`` (issue 20, item 1): two run folders, the second
    fitted with ``top_k = 8`` (its own record of the mixture), and a seconds-per-epoch column."""
    out = tmp_path / "runs"
    output = run_quick(
        "data_sets", "--out", str(out), "--kinds", "decoupled-dense", "decoupled-topk8"
    )
    header = next(line for line in output.splitlines() if line.startswith("| data set |"))
    assert header.rstrip(" |").endswith("s/epoch")
    rows = table_body(output, "| data set |")
    assert [row[1] for row in rows[:2]] == ["decoupled-dense", "decoupled-topk8"]
    assert all(float(row[5].split()[0]) > 0 for row in rows[:2])
    dense, truncated = (
        json.loads((out / f"synthetic-{slug}-seed0" / "summary.json").read_text())["gmm"]
        for slug in ("decoupled-dense", "decoupled-topk8")
    )
    assert dense["top_k"] is None and truncated["top_k"] == 8
    assert {k: v for k, v in dense.items() if k != "top_k"} == {
        k: v for k, v in truncated.items() if k != "top_k"
    }


@pytest.mark.parametrize("name", ["mnist5k-inverted", "mnist5k-rotated"])
def test_derived_data_sets_transform_the_embedded_images(tmp_path: Path, name: str) -> None:
    root = derived_datasets.write_derived(tmp_path, name)
    test = EmbeddedMNIST(split="test")
    assert len(list((root / "val").rglob("*.png"))) == len(test.labels)
    assert len(list((root / "train").rglob("*.png"))) == len(EmbeddedMNIST().labels)
    first = np.asarray(Image.open(root / "val" / str(int(test.labels[0])) / "00000.png"))
    original = np.asarray(test.images[0], dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(first, derived_datasets.DERIVED[name](original))
