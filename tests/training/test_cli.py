"""The `protogmm` command: config errors are one line naming the key; fit and demo run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY_FIT, fit_error_line, run_cli
from protogmm.cli import main

#: One epoch (4 steps).
FIT_ARGS = [*TINY_FIT, "--trainer.max_epochs=1"]


def test_unknown_key_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    result = run_cli("fit", "--model.num_protoypes", "8", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "model.num_protoypes" in lines[0]


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--model.lr", "-0.1"], "model.lr"),
        (["--model.num_prototypes", "0"], "model.num_prototypes"),
        (["--model.backbone", "alexnet"], "model.backbone"),
        (["--data.local_size", "64"], "local_size"),
        (["--model.lr", "fast"], "model.lr"),
        (["--model.prototype_init_scale", "0"], "model.prototype_init_scale"),
        (["--model.schedule_steps", "0"], "model.schedule_steps"),
        # the held-out split draws half as many: the message names the key and its value
        (
            ["--data.dataset", "synthetic", "--data.synthetic.samples", "10"],
            "data.synthetic.samples must be an integer >= 20, got 10",
        ),
    ],
)
def test_bad_values_are_one_line_errors_before_training(
    tmp_path: Path, args: list[str], culprit: str
) -> None:
    assert culprit in fit_error_line(tmp_path, *args)


def test_fit_writes_a_run_directory_with_the_resolved_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("fit", *FIT_ARGS, "--trainer.default_root_dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "config.yaml",
        "metrics.csv",
        "report.md",
        "summary.json",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).exists(), name
    assert "num_prototypes: 32" in (run_dir / "config.yaml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_prototypes"] == 32 and summary["prototypes"] == "decoupled"
    # The mixture's settings as resolved, defaults included (split and merge on by default).
    assert summary["gmm"]["merge_overlap"] == 0.5 and summary["gmm"]["reseed_min_share"] == 0.05
    assert summary["gmm"]["covariance"] == "diagonal" and summary["gmm"]["init_samples"] is None
    assert summary["gmm"]["anneal_steps"] == round(0.1 * summary["steps"])


def test_unknown_command_and_help() -> None:
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    result = run_cli("demo", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| joint |" in result.stdout and "| decoupled |" in result.stdout
    assert (tmp_path / "demo" / "collapse_over_training.png").exists()


def test_fit_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli("fit", *FIT_ARGS, "--trainer.default_root_dir", str(run_dir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # Checkpoints load with weights_only=True: only tensors and plain containers inside.
    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0
    resumed = run_cli(
        "fit",
        *FIT_ARGS,
        "--trainer.max_epochs=2",
        "--trainer.default_root_dir",
        str(run_dir),
        "--ckpt_path",
        str(run_dir / "checkpoints" / "last.ckpt"),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8


def test_an_empty_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    result = run_cli("fit", "--config", str(empty), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines == [f"protogmm fit: error: --config {empty}: the file is empty (no keys to set)"]
