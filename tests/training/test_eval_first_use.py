"""`protogmm eval` / `diagnose` on a first use: the checkpoint's own data by default, and one
line (no traceback) when the data's images do not fit the checkpoint's encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from protogmm.cli import main


def _checkpoint(tiny_run: Callable[[str], Path]) -> str:
    return str(tiny_run("decoupled") / "checkpoints" / "last.ckpt")


def test_eval_without_data_arguments_uses_the_data_the_checkpoint_was_trained_on(
    tiny_run: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny run trained on the synthetic set: the default (MNIST-5k) would not fit it.
    assert main(["eval", "knn", _checkpoint(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "on synthetic" in out and "| trained |" in out


@pytest.mark.parametrize("command", [["eval", "knn"], ["diagnose"]])
def test_data_with_other_channels_than_the_encoder_is_one_line_naming_the_fix(
    tiny_run: Callable[[str], Path], capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    checkpoint = _checkpoint(tiny_run)
    argv = [*command, checkpoint, "--data", "synthetic", "--data.in_channels", "3"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "1-channel images" in lines[0] and "3-channel" in lines[0]
    assert "--data checkpoint" in lines[0] and checkpoint in lines[0]


@pytest.mark.parametrize("eps", ["0", "-0.1", "2.5"])
def test_diagnose_names_a_bad_eps_before_reading_anything(
    tiny_run: Callable[[str], Path], capsys: pytest.CaptureFixture[str], eps: str
) -> None:
    assert main(["diagnose", _checkpoint(tiny_run), "--eps", "0.1", eps]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.strip()
        == f"protogmm diagnose: error: --eps {float(eps):g}: each ε must be in (0, 2]"
    )


def test_long_tail_diversity_assigns_with_the_teachers_batch_statistics(
    tiny_run: Callable[[str], Path],
) -> None:
    import torch

    from protogmm.evaluation import prototype_diversity
    from protogmm.evaluation.features import extract_features
    from protogmm.training.checkpoints import load_module
    from protogmm.training.datamodule import datamodule_from_checkpoint
    from protogmm.training.longtail_eval import teacher_prototype_diversity

    checkpoint = tiny_run("decoupled") / "checkpoints" / "last.ckpt"
    module, data = load_module(checkpoint), datamodule_from_checkpoint(checkpoint)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    measured = teacher_prototype_diversity(module, data)
    # The running statistics (and everything else) are left as they were.
    after = module.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    # Reference: the whole teacher on the training split, each batch normalised by itself.
    train_loader, _ = data.knn_dataloaders()
    teacher = torch.nn.Sequential(module.teacher["backbone"], module.teacher["head"])
    embeddings, labels = extract_features(teacher, train_loader, batch_statistics=True)
    with torch.no_grad():
        assignments = module.teacher_prototype_set()(embeddings).argmax(dim=1)
    assert measured == prototype_diversity(assignments, labels, data.frequency_groups())


def test_eval_at_another_image_size_says_so_and_runs(
    tiny_run: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _checkpoint(tiny_run)  # trained at 16 px
    argv = ["eval", "knn", checkpoint, "--data", "checkpoint", "--data.image_size", "20"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"note: {checkpoint} was trained at 16 px, the data gives 20 px"
    assert "| trained |" in captured.out
