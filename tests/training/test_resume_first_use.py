"""First use of resume, the run report and checkpoint reading: a run stopped by ``max_steps``
in the middle of an epoch, then extended from its ``last.ckpt``.

The shared run: 80 synthetic images, batch 16 (5 batches an epoch); the first fit stops at
step 3 (``max_steps=3``), the second resumes from its last.ckpt with ``max_steps=6``: the rest
of epoch 0, then one step of epoch 1.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers import STEP_BY_STEP, TINY_MODEL, fit_tiny, metric_rows, tiny_data
from protogmm.cli import main
from protogmm.diagnostics.external import load_prototypes
from protogmm.training.atomic_io import read_checkpoint
from protogmm.training.checkpoints import load_module
from protogmm.training.export import export_module, prototypes_path
from protogmm.training.resume_check import SCHEDULE_KEY, check_resume_compatible
from protogmm.training.run_report import render_report


def five_batch_data() -> L.LightningDataModule:
    """80 images, batch 16: 5 batches (steps) an epoch."""
    return tiny_data(num_local_crops=0, synthetic={"samples": 80, "image_size": 16})


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run stopped at step 3 and extended to step 6, and what each fit left behind."""
    run_dir = tmp_path_factory.mktemp("extended") / "run"
    settings = {"max_epochs": -1, **STEP_BY_STEP}
    started = time.perf_counter()
    fit_tiny(run_dir, TINY_MODEL, five_batch_data(), max_steps=3, **settings)
    first_wall = time.perf_counter() - started
    first = {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "report": (run_dir / "report.md").read_text(),
        "rows": metric_rows(run_dir),
        "checkpoint": run_dir.parent / "first.ckpt",
    }
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", first["checkpoint"])
    started = time.perf_counter()
    fit_tiny(
        run_dir,
        TINY_MODEL,
        five_batch_data(),
        max_steps=6,
        ckpt_path=first["checkpoint"],
        **settings,
    )
    return {
        "dir": run_dir,
        "first": first,
        "walls": (first_wall, time.perf_counter() - started),
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "report": (run_dir / "report.md").read_text(),
    }


# ---------------------------------------------------------------------- 1. seconds per epoch
def test_an_epoch_resumed_in_its_middle_is_timed_across_the_resume(
    extended_run: dict[str, Any],
) -> None:
    first, summary = extended_run["first"], extended_run["summary"]
    # Both fits together took longer than any epoch (not the clock's 0, hours ago).
    seconds = summary["seconds_per_epoch"]
    assert 0 < seconds <= sum(extended_run["walls"])
    # The first fit ran 3 of epoch 0's 5 batches: its number says what it covers.
    assert first["summary"]["seconds_per_epoch"] > 0
    assert first["summary"]["seconds_per_epoch_note"] == (
        "epoch 0 ran 3 of 5 batches, no epoch ran whole"
    )
    assert "(epoch 0 ran 3 of 5 batches, no epoch ran whole)" in first["report"]
    # The checkpoint holds those seconds; the resumed fit adds its own for epoch 0's rest.
    saved = torch.load(first["checkpoint"], weights_only=True)["callbacks"]["RunReport"]
    before = saved["epoch_in_progress"]
    assert (before["epoch"], before["batches"], before["from_start"]) == (0, 3, True)
    # Epoch 0 is whole now (3 batches before the resume, 2 after); epoch 1's one step is
    # partial, so not averaged.
    assert before["seconds"] < seconds
    assert "seconds_per_epoch_note" not in summary
    assert f"- seconds per epoch: {seconds:.1f}\n" in extended_run["report"]


# ---------------------------------------------------------------------- 2. trainer settings
def resume_notes(checkpoint: Path, model: dict[str, Any] | None = None, **trainer: Any) -> list:
    """``check_resume_compatible``'s notes for a resume with these trainer settings."""
    saved = torch.load(checkpoint, weights_only=True)
    settings = {"max_epochs": -1, "accelerator": "cpu", "devices": 1, "logger": False}
    return check_resume_compatible(
        checkpoint,
        saved["hyper_parameters"] | (model or {}),
        saved["datamodule_hyper_parameters"],
        world_size=1,
        trainer=L.Trainer(**(settings | trainer), enable_checkpointing=False),
    )


def test_a_changed_max_steps_is_a_note_that_the_schedules_change(
    extended_run: dict[str, Any],
) -> None:
    checkpoint = extended_run["first"]["checkpoint"]
    record = torch.load(checkpoint, weights_only=True)[SCHEDULE_KEY]
    assert (record["horizon"], record["max_steps"], record["training_batches"]) == (3, 3, 5)
    assert resume_notes(checkpoint, max_steps=3) == []  # the same settings: exact
    (note,) = resume_notes(checkpoint, max_steps=6)
    assert note.startswith(
        "trainer.max_steps: 3 -> 6: the schedules (lr, weight decay, teacher momentum) span "
        "6 steps instead of 3 (--model.schedule_steps 3 keeps them"
    )
    # The way out the note names: the same schedules, so no note at all.
    assert resume_notes(checkpoint, {"schedule_steps": 3}, max_steps=6) == []
    # Settings that change what a step computes are listed too.
    notes = resume_notes(checkpoint, max_steps=3, gradient_clip_val=1.0)
    assert notes == ["trainer.gradient_clip_val: None -> 1.0"]


def test_a_checkpoint_without_the_schedule_record_still_resumes(
    extended_run: dict[str, Any], tmp_path: Path
) -> None:
    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(extended_run["first"]["checkpoint"], weights_only=True)
    del checkpoint[SCHEDULE_KEY]
    # The state of before, which counted epoch 0's first 3 batches as a whole epoch.
    checkpoint["callbacks"]["RunReport"] = {"epoch_seconds": [1000.0]}
    torch.save(checkpoint, old)
    assert resume_notes(old, max_steps=6) == []  # nothing to compare the trainer against
    # ... and a fit resumes from it: the resumed part of epoch 0 is not a whole epoch.
    fit_tiny(
        tmp_path / "run",
        TINY_MODEL,
        five_batch_data(),
        max_steps=5,
        max_epochs=-1,
        ckpt_path=old,
        **STEP_BY_STEP,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["seconds_per_epoch"] < 1000
    assert summary["seconds_per_epoch_note"].startswith(
        "epoch 0: only its batches after the resume were timed"
    )


# ---------------------------------------------------------------------- 3. metrics.csv
def test_the_first_fits_last_measurements_are_kept_after_the_resume(
    extended_run: dict[str, Any],
) -> None:
    rows = metric_rows(extended_run["dir"])
    collapse = [int(row["step"]) for row in rows if row.get("unique_pct/eps=0.1")]
    # Step 3: the first fit's end-of-fit measurement (before its checkpoint, never repeated).
    assert collapse == [2, 3, 4, 5, 6]  # (none at step 0: the mixture is fitted on step 0)

    def at_step_3(table: list[dict[str, str]]) -> list[dict[str, str]]:
        return [
            {key: value for key, value in row.items() if value}
            for row in table
            if row["step"] == "3" and row.get("unique_pct/eps=0.1")
        ]

    assert at_step_3(rows) == at_step_3(extended_run["first"]["rows"])
    losses = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert losses == list(range(6))  # every step once
    # By design: the first fit ended with a k-NN measurement of epoch 0 (at its step 3, logged
    # as step 2 like every epoch-end metric); the resumed fit measures epoch 0's real end.
    knn = [(row["epoch"], int(row["step"])) for row in rows if row.get("knn/top1")]
    assert knn == [("0", 2), ("0", 4), ("1", 5)]


def test_a_resume_without_baselines_neither_remeasures_them_nor_drops_the_history(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    settings = {"max_epochs": 2, "checkpoint_every_n_steps": 3, "baseline_memory_mb": 0.0}
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_tiny(run_dir, TINY_MODEL, five_batch_data(), crash_at_step=4, **settings)
    fit_tiny(
        run_dir,
        TINY_MODEL,
        five_batch_data(),
        ckpt_path=run_dir / "checkpoints" / "last.ckpt",
        **settings,
    )
    rows = metric_rows(run_dir)
    assert [int(row["step"]) for row in rows if row.get("train/loss")] == list(range(10))
    assert not any(row.get("knn/untrained") for row in rows)  # not measured on trained weights


# ---------------------------------------------------------------------- 4. report.md
def test_the_report_counts_one_epoch_in_the_singular(extended_run: dict[str, Any]) -> None:
    assert extended_run["first"]["summary"]["epochs"] == 1
    assert "K = 32, 1 epoch, 3 steps" in extended_run["first"]["report"]
    assert "K = 32, 2 epochs, 6 steps" in extended_run["report"]
    summary = dict(extended_run["summary"], epochs=1, steps=1, seconds_per_epoch=None)
    assert "1 epoch, 1 step\n- seconds per epoch: n/a\n" in render_report(summary, [])


# ---------------------------------------------------------------------- 5. export's mode
@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_exported_files_get_the_usual_mode(
    extended_run: dict[str, Any], tmp_path: Path, umask_022: None
) -> None:
    pytest.importorskip("safetensors")
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"an older export")  # replaced whole
    backbone, prototypes = export_module(load_module(extended_run["first"]["checkpoint"]), out)
    assert prototypes == prototypes_path(out)
    for path in (backbone, prototypes):
        assert path.stat().st_mode & 0o777 == 0o644, path
    # No temporary file is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([backbone.name, prototypes.name])
    assert len(load_prototypes(prototypes)) == 1


# ---------------------------------------------------------------------- 6. checkpoint errors
def test_a_directory_given_as_a_checkpoint_is_named_a_directory(tmp_path: Path) -> None:
    expected = f"checkpoint path is a directory, not a file: {tmp_path}"
    for reader in (read_checkpoint, load_module, load_prototypes):
        with pytest.raises(IsADirectoryError) as info:
            reader(tmp_path)
        assert str(info.value) == expected, reader


def test_a_truncated_checkpoint_is_one_line_in_the_same_words_everywhere(
    extended_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.ckpt"
    whole = extended_run["first"]["checkpoint"].read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    expected = (
        f"{truncated}: cannot be read: truncated or corrupt checkpoint (not a zip archive "
        "torch can read: its end is missing)"
    )
    for reader in (read_checkpoint, load_module, load_prototypes):
        with pytest.raises(ValueError) as info:
            reader(truncated)
        assert str(info.value) == expected, reader
    for command in (["diagnose", str(truncated)], ["export", str(truncated), "--out", "x"]):
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"protogmm {command[0]}: error: {expected}"]
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt: cannot be read: truncated or corrupt"):
        load_prototypes(empty)
