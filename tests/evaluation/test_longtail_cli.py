"""The long-tail analysis in a run's report and in ``protogmm diagnose --data``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY_MODEL, fit_tiny
from protogmm.cli import main
from protogmm.training.datamodule import SSLDataModule

# Synthetic, 4 classes, rho = 8 over 120 images: counts 64, 32, 16, 8. With thresholds
# (0.4, 0.2) of the head class (many > 25.6, few < 12.8): many = {0, 1}, medium = {2},
# few = {3}.
LONG_TAILED = {
    "dataset": "synthetic",
    "synthetic": {"samples": 120, "classes": 4, "image_size": 16, "imbalance_ratio": 8.0},
    "longtail": {"thresholds": (0.4, 0.2), "relative": True},
    "batch_size": 32,
    "num_local_crops": 0,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("longtail") / "run"
    fit_tiny(root, TINY_MODEL | {"prototypes": "joint"}, SSLDataModule(**LONG_TAILED), devices=1)
    return root


def test_run_report_has_the_per_group_tables(run_dir: Path) -> None:
    counts = json.loads((run_dir / "class_counts.json").read_text())
    assert counts["counts"] == [64, 32, 16, 8] and counts["total"] == 120
    summary = json.loads((run_dir / "summary.json").read_text())
    longtail = summary["longtail"]
    assert {g: v["classes"] for g, v in longtail["groups"].items()} == {
        "many": [0, 1],
        "medium": [2],
        "few": [3],
    }
    trained = longtail["results"]["trained"]
    diversity = trained["prototypes"]
    assert [diversity[g]["samples"] for g in ("many", "medium", "few", "all")] == [96, 16, 8, 120]
    for group in ("many", "medium", "few"):
        d = diversity[group]
        assert d["per_sample"] == d["distinct"] / d["samples"]
        assert d["per_class"] == d["distinct"] / d["classes"]
        assert 0 <= trained["knn"][group] <= 1 and 0 <= trained["linear"][group] <= 1
    assert set(longtail["results"]) == {"trained", "untrained encoder", "raw pixels"}
    report = (run_dir / "report.md").read_text()
    assert "| few | 1 | 8 |" in report and "k-NN untrained encoder" in report


def test_diagnose_with_the_checkpoint_data_prints_the_groups(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    args = ["diagnose", str(checkpoint), "--out", str(tmp_path), "--data", "checkpoint"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ever chosen" in out
    assert "many > 25.6, medium 12.8-25.6, few < 12.8" in out
    assert "| few | 1 | 8 |" in out and "| group | classes | train images | distinct |" in out
    # The same numbers the run report measured at the end of training.
    summary = json.loads((run_dir / "summary.json").read_text())
    few = summary["longtail"]["results"]["trained"]["prototypes"]["few"]
    assert f"| few | 1 | 8 | {few['distinct']} |" in out


def test_diagnose_on_balanced_data_says_why_there_are_no_groups(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    args = ["diagnose", str(checkpoint), "--out", str(tmp_path), "--data", "synthetic"]
    args += ["--data-arg", "synthetic.samples=64"]
    assert main(args) == 0
    assert "every training class falls in one frequency group" in capsys.readouterr().out


def test_diagnose_bad_data_arg_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    args = ["diagnose", str(checkpoint), "--out", str(tmp_path), "--data", "synthetic"]
    assert main([*args, "--data-arg", "imbalance=3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--data-arg 'imbalance=3'" in err
    assert main([*args, "--data-arg", "imbalance.ratio=0.5"]) == 2
    assert "data.imbalance.ratio" in capsys.readouterr().err
    missing = [
        "--data",
        "folder",
        "--data-root",
        str(tmp_path / "none"),
        "--data-arg",
        "image_size=16",
    ]
    assert main([*args[:4], *missing]) == 2
    assert "data.root: folder not found" in capsys.readouterr().err
