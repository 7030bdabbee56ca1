"""`protogmm diagnose`, `eval` and `compare` on real (tiny) runs and foreign checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from protogmm.cli import main
from protogmm.diagnostics import data_reference_curve
from protogmm.evaluation.features import extract_features
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import SSLDataModule


@pytest.fixture(scope="module")
def runs(tiny_run: Callable[[str], Path]) -> dict[str, Path]:
    """One tiny joint run and one tiny decoupled run on synthetic 16 px images."""
    return {kind: tiny_run(kind) for kind in ("joint", "decoupled")}


def test_run_report_embeds_the_plots(runs: dict[str, Path]) -> None:
    report = (runs["decoupled"] / "report.md").read_text()
    for name in ("collapse_over_training.png", "unique_vs_eps.png", "prototype_geometry.png"):
        assert f"]({name})" in report and (runs["decoupled"] / name).stat().st_size > 5000


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_diagnose_own_checkpoint(
    runs: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = runs[kind] / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "diagnose",
                str(checkpoint),
                "--eps",
                "0.025",
                "0.5",
                "--out",
                str(tmp_path),
                "--data",
                "synthetic",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "unique ε=0.025" in out and "ever chosen" in out
    assert (tmp_path / "unique_vs_eps.png").exists()
    assert (tmp_path / "prototype_geometry.png").exists()
    # The data's reference row: the cover of K teacher embeddings of the held-out split,
    # embedded as in training (BatchNorm on batch statistics).
    module = load_module(checkpoint)
    _, test_loader = SSLDataModule(dataset="synthetic").knn_dataloaders()
    teacher = torch.nn.Sequential(module.teacher["backbone"], module.teacher["head"])
    embeddings, _ = extract_features(teacher, test_loader, batch_statistics=True)
    curve, drawn = data_reference_curve(embeddings, module.hparams.num_prototypes, [0.025, 0.5])
    expected = " | ".join(f"{curve[e]} ({100 * curve[e] / drawn:.1f}%)" for e in (0.025, 0.5))
    assert f"| held-out split | {drawn} | {expected} |" in out


def test_diagnose_a_dino_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = torch.randn(64, 16)
    v[32:] = v[0] + 1e-4 * torch.randn(32, 16)  # half the prototypes collapsed onto one
    path = tmp_path / "dino.pth"
    torch.save(
        {"teacher": {"head.last_layer.weight_g": torch.ones(64, 1), "head.last_layer.weight_v": v}},
        path,
    )
    assert main(["diagnose", str(path), "--eps", "0.025", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "32 (50.0%)" in out  # rows 0..31 distinct; row 0 absorbs its copies 32..63


def test_diagnose_measures_an_imperfect_set_on_its_usable_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = torch.randn(20, 8)
    bad[3] = float("nan")
    bad[7] = 0.0
    good = torch.randn(10, 8)
    path = tmp_path / "two_layers.pth"
    torch.save({"model": {"a.last_layer.weight": bad, "b.last_layer.weight": good}}, path)
    assert main(["diagnose", str(path), "--eps", "0.025", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "18 (2 non-finite or zero rows left out)" in out  # the layer named, measured
    assert "| 18 (100.0%)" in out and "| 10 (100.0%)" in out  # and the other layer too
    assert (tmp_path / "d" / "unique_vs_eps.png").exists()


def test_diagnose_a_single_prototype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.pth"
    torch.save({"last_layer.weight": torch.randn(1, 8)}, path)
    assert main(["diagnose", str(path), "--eps", "0.025", "--out", str(tmp_path / "d")]) == 0
    assert "1 (100.0%)" in capsys.readouterr().out
    assert (tmp_path / "d" / "unique_vs_eps.png").exists()  # no geometry plot for K = 1


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_eval_prints_baselines(
    runs: dict[str, Path], protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = runs["joint"] / "checkpoints" / "last.ckpt"
    args = ["eval", protocol, str(checkpoint), "--data", "synthetic", "--epochs", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for row in ("| trained |", "| untrained encoder |", "| raw pixels |"):
        assert row in out


def test_compare_two_runs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["compare", str(runs["joint"]), str(runs["decoupled"]), "--out", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert "| joint |" in out and "| decoupled |" in out
    assert (tmp_path / "collapse_over_training.png").exists()
    assert (tmp_path / "unique_vs_eps.png").exists()


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a protogmm run directory" in capsys.readouterr().err
    # (A set with a NaN row is measured on its usable rows, see the test above.)
