"""The hostile cases of issue 17, replayed: every one ends in one line naming the culprit,
and nothing saved is lost.

Each test was red on the code before the fix (noted per test). The image-file cases
(symlink loops, 16-bit and float images, non-UTF-8 names, decompression bombs) live in
``tests/data/test_hostile_folders.py``; exact resume from every checkpoint cadence in
``test_resume.py``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import TINY_FIT
from protogmm.cli import main
from protogmm.integrity import CorruptCheckpointError, check_checkpoint_integrity
from protogmm.training import run_folder
from protogmm.training.reliability import AtomicCheckpointIO, read_checkpoint
from protogmm.training.run_folder import LOCK_NAME

#: One epoch (4 steps) without local crops.
FIT_ARGS = [*TINY_FIT, "--data.num_local_crops=0", "--trainer.max_epochs=1"]


def fit(run_dir: Path, *extra: str) -> int:
    return main(["fit", *FIT_ARGS, f"--trainer.default_root_dir={run_dir}", *extra])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's error: exactly one line on stderr starting with ``protogmm``."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (one epoch, 4 steps), never modified by the tests."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert fit(run_dir) == 0
    return run_dir


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------- the run folder (item 4)
def test_a_fit_into_a_folder_holding_a_run_is_refused_and_changes_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the second fit silently replaced last.ckpt, metrics.csv and summary.json.
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = run_files(run_dir)
    assert fit(run_dir) == 2
    line = one_error_line(capsys)
    assert str(run_dir) in line and "holds a run already" in line and "--overwrite" in line
    assert run_files(run_dir) == before


def test_overwrite_replaces_the_old_run_whole(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_run(finished_run, tmp_path / "run")
    stray = run_dir / "checkpoints" / "best-knn-epoch=7-top1=0.9900.ckpt"
    stray.write_bytes(b"an old run's checkpoint")
    assert fit(run_dir, "--overwrite=true") == 0
    assert not stray.exists()  # no file of the old run is left to mix with the new one
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not (run_dir / LOCK_NAME).exists()


def test_a_second_fit_into_a_folder_in_use_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: two concurrent fits into one folder both crashed and left a mixed folder.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK_NAME).write_text(f"{os.uname().nodename} {owner.pid}\n")
        assert fit(run_dir) == 2
        line = one_error_line(capsys)
        assert "in use by another protogmm run" in line and str(owner.pid) in line
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    finally:
        owner.kill()
        owner.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / LOCK_NAME).write_text(f"{os.uname().nodename} {dead.pid}\n")
    old = os.stat(run_dir / LOCK_NAME).st_mtime - 60
    os.utime(run_dir / LOCK_NAME, (old, old))
    assert fit(run_dir) == 0
    assert not (run_dir / LOCK_NAME).exists()


def test_a_run_folder_under_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a traceback (NotADirectoryError) from deep inside Lightning.
    (tmp_path / "file").write_text("not a folder")
    assert fit(tmp_path / "file" / "run") == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "file" / "run") in line and "a part of the path is a file" in line


def test_a_full_disk_is_one_line_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_space(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.os, "fsync", no_space)
    assert fit(tmp_path / "run") == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "run") in line and "no space left" in line


def test_a_disk_full_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(
    finished_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def disk_full(self: AtomicCheckpointIO, checkpoint: dict, handle: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "write", disk_full)
    assert fit(run_dir, "--ckpt_path=last", "--trainer.max_epochs=2") == 2
    line = one_error_line(capsys)
    # The first write of epoch 1 (the best-k-NN checkpoint, or last.ckpt) is named.
    assert f"{last.parent}/" in line and ".ckpt: No space left on device" in line
    assert last.read_bytes() == before  # the previous checkpoint, whole
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert fit(tmp_path / "ro" / "run") == 2
        assert "permission denied" in one_error_line(capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)


# ----------------------------------------------------------- --ckpt_path last (item 3)
def test_ckpt_path_last_is_checked_like_any_path(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "last" skipped the check, rewrote config.yaml, deleted metrics.csv, then
    # failed with a traceback.
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = run_files(run_dir)
    assert fit(run_dir, "--ckpt_path=last", "--model.num_prototypes=64") == 2
    line = one_error_line(capsys)
    assert "model.num_prototypes is 32 in the checkpoint but 64" in line
    assert run_files(run_dir) == before


def test_ckpt_path_last_without_a_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fit(tmp_path / "empty", "--ckpt_path=last") == 2
    assert "no checkpoint" in one_error_line(capsys)


def test_ckpt_path_last_resumes_the_folders_own_run(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path / "run")
    assert fit(run_dir, "--ckpt_path=last", "--trainer.max_epochs=2") == 0
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8


# ------------------------------------------------------ checkpoint integrity (item 5)
def flip_bytes_in_a_tensor(checkpoint: Path, target: Path, count: int = 4096) -> Path:
    """A copy of ``checkpoint`` with ``count`` bytes of its largest tensor record inverted."""
    with zipfile.ZipFile(checkpoint) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
        record = max(storages, key=lambda info: info.file_size)
        # The record's data follow its 30-byte local header, name and extra field.
        with open(checkpoint, "rb") as handle:
            handle.seek(record.header_offset + 26)
            name_length = int.from_bytes(handle.read(2), "little")
            extra_length = int.from_bytes(handle.read(2), "little")
    start = record.header_offset + 30 + name_length + extra_length
    data = bytearray(checkpoint.read_bytes())
    count = min(count, record.file_size)
    data[start : start + count] = bytes(255 - b for b in data[start : start + count])
    target.write_bytes(bytes(data))
    return target


def test_a_checkpoint_with_flipped_bytes_is_refused_everywhere(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = flip_bytes_in_a_tensor(
        finished_run / "checkpoints" / "last.ckpt", tmp_path / "corrupt.ckpt"
    )
    # torch itself does not notice (this is what resumed with weights of 1e6 before):
    torch.load(corrupt, weights_only=True, map_location="cpu")
    with pytest.raises(CorruptCheckpointError, match="fails its CRC-32 check"):
        check_checkpoint_integrity(corrupt)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        read_checkpoint(corrupt)
    for command in (
        [
            "fit",
            *FIT_ARGS,
            f"--trainer.default_root_dir={tmp_path / 'r'}",
            f"--ckpt_path={corrupt}",
        ],
        ["diagnose", str(corrupt), "--out", str(tmp_path / "d")],
        ["eval", "knn", str(corrupt), "--data", "synthetic"],
    ):
        assert main(command) == 2, command[0]
        line = one_error_line(capsys)
        assert str(corrupt) in line and "corrupt checkpoint" in line, command[0]
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_an_intact_checkpoint_passes_and_is_checked_once(finished_run: Path) -> None:
    last = finished_run / "checkpoints" / "last.ckpt"
    check_checkpoint_integrity(last)
    check_checkpoint_integrity(last)  # cached by (path, size, mtime): the resume reads twice


# --------------------------------------------- checkpoints that lie about their model (11)
def rewritten(finished_run: Path, target: Path, edit: object) -> Path:
    checkpoint = read_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    edit(checkpoint)  # type: ignore[operator]
    torch.save(checkpoint, target)
    return target


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("huge-k", "size mismatch"),
        ("no-mixture", "Missing key"),
    ],
)
def test_eval_on_a_checkpoint_that_disagrees_with_itself_is_one_line(
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    expected: str,
) -> None:
    # Before: a traceback of load_state_dict, or 10**12 x d floats allocated first.
    def edit(checkpoint: dict) -> None:
        if case == "huge-k":
            checkpoint["hyper_parameters"]["num_prototypes"] = 10**12
        else:
            for key in [k for k in checkpoint["state_dict"] if ".gmm." in f".{k}"]:
                del checkpoint["state_dict"][key]

    path = rewritten(finished_run, tmp_path / f"{case}.ckpt", edit)
    assert main(["eval", "knn", str(path), "--data", "synthetic"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "do not match its own hyperparameters" in line
    assert expected in line
