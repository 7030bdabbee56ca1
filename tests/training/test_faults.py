"""Faults: a kill during a checkpoint write, non-finite values, checkpoints that do not fit.

Tiny models on 16 px synthetic data (4 steps per epoch). The kill test runs ``protogmm fit``
in a subprocess whose checkpoint writer pauses half-way through a write (the
:class:`PausingCheckpointIO` below, chosen with ``--trainer.plugins``), kills it with
SIGKILL there, and resumes the run from what is left on disk.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TINY_FIT, TINY_MODEL, child_environment, logged, tiny_data
from protogmm.cli import main
from protogmm.hosts import DINO, IBOT
from protogmm.prototypes import Joint
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import datamodule_from_checkpoint
from protogmm.training.distributed import check_launch
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import (
    AtomicCheckpointIO,
    NonFiniteError,
    NonFiniteGuard,
    check_resume_compatible,
    read_checkpoint,
)
from protogmm.training.runner import run_logger

#: The tiny model with a half-epoch warm-up.
MODEL = TINY_MODEL | {"warmup_epochs": 0.5}
HERE = Path(__file__).parent


# ---------------------------------------------------------------------- atomic writes
class PausingCheckpointIO(AtomicCheckpointIO):
    """Writes half of the ``PROTOGMM_TEST_PAUSE_ON_SAVE``-th checkpoint, then waits.

    It touches ``PROTOGMM_TEST_PAUSE_MARKER`` once the half is on disk, so the test knows
    when to kill. Every other save is an ordinary atomic save.
    """

    saves = 0

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        type(self).saves += 1
        if type(self).saves != int(os.environ.get("PROTOGMM_TEST_PAUSE_ON_SAVE", "0")):
            super().write(checkpoint, handle)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        payload = buffer.getvalue()
        handle.write(payload[: len(payload) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        Path(os.environ["PROTOGMM_TEST_PAUSE_MARKER"]).touch()
        time.sleep(600)


class FailingCheckpointIO(AtomicCheckpointIO):
    """Raises half-way through every write (a full disk, say)."""

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        handle.write(b"partial")
        raise OSError("No space left on device")


def test_atomic_save_replaces_the_target_and_never_leaves_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    assert int(read_checkpoint(target)["step"]) == 2
    with pytest.raises(OSError, match="No space left"):
        FailingCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, target)
    assert int(read_checkpoint(target)["step"]) == 2  # the previous one, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.{dead.pid}.tmp"
    live = tmp_path / f".last.ckpt.{os.getppid()}.tmp"  # a running process: not ours to touch
    other = tmp_path / f".best.ckpt.{dead.pid}.tmp"  # another target: left for its own save
    for path in (stale, live, other):
        path.write_bytes(b"half")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists() and other.exists()


def test_loading_is_weights_only_and_errors_name_the_file(tmp_path: Path) -> None:
    pickled_code = tmp_path / "code.ckpt"
    torch.save({"step": 1, "hook": print}, pickled_code)  # a function: needs unpickling code
    with pytest.raises(ValueError, match=r"code\.ckpt: cannot be read as a weights-only"):
        AtomicCheckpointIO().load_checkpoint(pickled_code)
    truncated = tmp_path / "truncated.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: cannot be read"):
        read_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    # Every reader of a checkpoint goes through read_checkpoint: same one-line errors.
    for reader in (load_module, datamodule_from_checkpoint):
        with pytest.raises(ValueError, match=r"code\.ckpt: cannot be read as a weights-only"):
            reader(pickled_code)
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            reader(tmp_path / "missing.ckpt")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    args = [
        *TINY_FIT,
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.max_epochs=2",
        "--checkpoint_every_n_steps=2",
    ]
    env = child_environment(HERE)  # the child imports this file for the writer below
    env.update(
        PROTOGMM_TEST_PAUSE_ON_SAVE="2",  # step 2's last.ckpt is whole; step 4's is cut
        PROTOGMM_TEST_PAUSE_MARKER=str(marker),
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protogmm.cli",
            "fit",
            *args,
            '--trainer.plugins={"class_path": "test_faults.PausingCheckpointIO"}',
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)  # mid-write: half of step 4's checkpoint is on disk
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    checkpoints = run_dir / "checkpoints"
    half_written = list(checkpoints.glob(".last.ckpt.*.tmp"))
    assert len(half_written) == 1
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(half_written[0])
    previous = read_checkpoint(checkpoints / "last.ckpt")
    assert previous["global_step"] == 2

    monkeypatch.setattr(sys, "argv", ["protogmm"])
    resumed = main(["fit", *args, f"--ckpt_path={checkpoints / 'last.ckpt'}"])
    assert resumed == 0
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8
    assert not list(checkpoints.glob(".*.tmp"))  # the dead writer's half file is gone


# ---------------------------------------------------------------------- non-finite guard
class PoisonInput(L.Callback):
    """Turns one image of the first global view into NaN at the given steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, *_: Any) -> None:
        if trainer.global_step in self.steps:
            batch[0][0][3].fill_(math.nan)


class Snapshots(L.Callback):
    """Parameters, buffers and optimizer state at the start of every step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, *_: Any) -> None:
        state = {f"param.{k}": v.detach().clone() for k, v in module.named_parameters()}
        state.update({f"buffer.{k}": v.clone() for k, v in module.named_buffers()})
        for index, param_state in enumerate(trainer.optimizers[0].state.values()):
            for key, value in param_state.items():
                state[f"optimizer.{index}.{key}"] = value.clone()
        self.states[trainer.global_step] = state


def guarded_fit(
    run_dir: Path,
    action: str = "stop",
    callbacks: tuple[L.Callback, ...] = (),
    model: PrototypicalSSL | None = None,
    max_consecutive_skips: int = 20,
    checkpoint_every: int = 2,
) -> tuple[PrototypicalSSL, L.Trainer, NonFiniteGuard]:
    """Two epochs with the guard and a last.ckpt every few steps (no monitors, for speed)."""
    L.seed_everything(0, verbose=False)
    model = model or PrototypicalSSL.from_hparams(MODEL)
    guard = NonFiniteGuard(action, max_consecutive_skips=max_consecutive_skips)
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=run_logger(run_dir),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            *callbacks,
            guard,
            ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every),
        ],
    )
    trainer.fit(model, datamodule=tiny_data())
    return model, trainer, guard


def assert_finite_checkpoint(path: Path, global_step: int) -> None:
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == global_step
    for name, value in checkpoint["state_dict"].items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), name


def assert_unchanged(before: dict, after: dict, prefixes: tuple[str, ...]) -> None:
    assert before.keys() == after.keys()
    compared = [name for name in before if name.startswith(prefixes)]
    assert compared
    for name in compared:
        assert torch.equal(before[name], after[name]), name


def test_nan_input_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError) as raised:
        guarded_fit(tmp_path, callbacks=(PoisonInput({5}),))
    message = str(raised.value)
    assert message.startswith("step 5: non-finite input batch (batch[0][0]: 256 NaN, 0 Inf")
    assert "stopped before the optimizer step" in message
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in message
    assert_finite_checkpoint(tmp_path / "checkpoints" / "last.ckpt", global_step=4)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_nan_input_with_skip_trains_nothing_on_that_step_and_counts_it(tmp_path: Path) -> None:
    snapshots = Snapshots()
    model, trainer, guard = guarded_fit(tmp_path, "skip", callbacks=(PoisonInput({5}), snapshots))
    assert guard.skipped_steps == [5]
    assert trainer.global_step == 8
    # Step 5 moved nothing: student, teacher, mixture, centre, BatchNorm, optimizer moments.
    assert_unchanged(snapshots.states[5], snapshots.states[6], ("param.", "buffer.", "optimizer."))
    assert not torch.equal(snapshots.states[6]["buffer.gmm.mean"], model.gmm.mean)
    assert_finite_checkpoint(tmp_path / "checkpoints" / "last.ckpt", global_step=8)
    assert logged(tmp_path, "guard/skipped_steps")[-1][1] == 1.0
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["callbacks"]
    assert {"skipped_steps": [5]} in saved.values()


def nan_loss_at(model: PrototypicalSSL, step: int) -> PrototypicalSSL:
    """Makes the host loss NaN at ``step`` (inputs, embeddings and mixture stay finite)."""
    host_loss = model.host.cls_loss  # DINO's loss on the student's [CLS] embeddings

    def cls_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = host_loss(*args, **kwargs)
        return loss * math.nan if model.global_step == step else loss

    model.host.cls_loss = cls_loss
    return model


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_nan_loss_stops_or_is_skipped(tmp_path: Path, action: str) -> None:
    model = nan_loss_at(PrototypicalSSL.from_hparams(MODEL), step=3)
    if action == "stop":
        with pytest.raises(NonFiniteError, match=r"^step 3: non-finite loss \(loss: 1 NaN"):
            guarded_fit(tmp_path, action, model=model)
        assert_finite_checkpoint(tmp_path / "checkpoints" / "last.ckpt", global_step=2)
        return
    snapshots = Snapshots()
    model, trainer, guard = guarded_fit(tmp_path, action, callbacks=(snapshots,), model=model)
    assert guard.skipped_steps == [3] and trainer.global_step == 8
    # No weight, teacher or optimizer update; the mixture keeps this step's finite statistics.
    assert_unchanged(snapshots.states[3], snapshots.states[4], ("param.", "optimizer."))
    before, after = snapshots.states[3], snapshots.states[4]
    assert not torch.equal(before["buffer.gmm.mean"], after["buffer.gmm.mean"])


def test_a_nonfinite_mixture_statistic_stops_even_when_skipping(tmp_path: Path) -> None:
    model = PrototypicalSSL.from_hparams(MODEL)
    update = model.gmm.update_and_score  # what the training step calls (eq. 2)

    def corrupting_update(*args: Any, **kwargs: Any) -> Any:
        result = update(*args, **kwargs)
        if model.global_step == 3:
            model.gmm.stat_sum[0, 0] = math.inf
        return result

    model.gmm.update_and_score = corrupting_update
    with pytest.raises(NonFiniteError) as raised:
        guarded_fit(tmp_path, "skip", model=model)
    assert str(raised.value).startswith(
        "step 3: non-finite mixture/centre statistics (gmm.stat_sum: 0 NaN, 1 Inf of 512)"
    )
    assert_finite_checkpoint(tmp_path / "checkpoints" / "last.ckpt", global_step=2)


class PoisonTeacher(L.Callback):
    """Sets one teacher head weight to NaN at ``step`` (after the input check)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, *_: Any) -> None:
        if trainer.global_step == self.step:
            next(module.teacher["head"].parameters()).data[0, 0] = math.nan


def test_nonfinite_teacher_embeddings_stop_before_they_reach_the_mixture(tmp_path: Path) -> None:
    model = PrototypicalSSL.from_hparams(MODEL)
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite teacher embeddings"):
        guarded_fit(tmp_path, "skip", callbacks=(PoisonTeacher(3),), model=model)
    assert model.gmm.step == 3  # the mixture never saw step 3's embeddings
    assert bool(torch.isfinite(model.gmm.stat_sum).all())


def test_a_run_that_only_skips_stops_after_the_limit(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"^step 3: .* after 2 skipped steps in a row"):
        guarded_fit(tmp_path, "skip", callbacks=(PoisonInput({1, 2, 3}),), max_consecutive_skips=2)


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def mid_epoch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoupled run's last.ckpt at step 6: two batches into epoch 1."""
    run_dir = tmp_path_factory.mktemp("checkpointed")
    guarded_fit(run_dir, checkpoint_every=3)
    return run_dir / "checkpoints" / "last.ckpt"


def fit_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["fit", *TINY_FIT, *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("--model.num_prototypes=64", "model.num_prototypes is 32 in the checkpoint but 64"),
        ("--model.bottleneck_dim=8", "model.bottleneck_dim is 16 in the checkpoint but 8"),
        ("--model.prototypes=Joint", "model.prototypes is 'Decoupled' in the checkpoint"),
        ("--model.host=CARP", "model.host is 'DINO' in the checkpoint but 'CARP'"),
        ("--model.optimizer=lars", "model.optimizer is 'adamw' in the checkpoint but 'lars'"),
        (
            "--model.prototypes.gmm={covariance: isotropic}",
            "model.prototypes.gmm is {'top_k': 8} in the checkpoint but {'covariance':",
        ),
    ],
)
def test_a_checkpoint_of_another_config_is_one_line_before_any_step(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    mid_epoch_checkpoint: Path,
    override: str,
    culprit: str,
) -> None:
    monkeypatch.setattr(sys, "argv", ["protogmm"])
    run_dir = tmp_path / "run"
    code, lines = fit_cli(
        capsys,
        f"--trainer.default_root_dir={run_dir}",
        override,
        *(["--model.host.block_size=8"] if "CARP" in override else []),  # K = 32 needs it
        f"--ckpt_path={mid_epoch_checkpoint}",
    )
    assert code == 2
    assert len(lines) == 1 and culprit in lines[0], lines
    assert lines[0].startswith(f"protogmm fit: error: --ckpt_path {mid_epoch_checkpoint}")
    assert not (run_dir / "metrics.csv").exists()


def test_a_mid_epoch_checkpoint_needs_its_process_layout(mid_epoch_checkpoint: Path) -> None:
    checkpoint = read_checkpoint(mid_epoch_checkpoint)
    hparams = dict(checkpoint["hyper_parameters"])
    data = dict(checkpoint["datamodule_hyper_parameters"])
    assert check_resume_compatible(mid_epoch_checkpoint, hparams, data, world_size=1) == []
    with pytest.raises(
        ValueError, match=r"mid-epoch by 1 process\(es\) x 16 images, resumed with 2 x 16"
    ):
        check_resume_compatible(mid_epoch_checkpoint, hparams, data, world_size=2)
    with pytest.raises(ValueError, match="resumed with 1 x 8"):
        check_resume_compatible(mid_epoch_checkpoint, hparams, data | {"batch_size": 8}, 1)
    notes = check_resume_compatible(mid_epoch_checkpoint, hparams | {"lr": 0.5}, data, 1)
    assert notes == ["model.lr: 0.001 -> 0.5"]


@pytest.mark.parametrize(
    ("saved", "now", "fails"),
    [
        ({}, 1.0, False),  # a checkpoint from before the option: two groups, as at 1
        ({}, 3.0, True),
        ({"prototype_lr_multiplier": 3.0}, 1.0, True),
        ({"prototype_lr_multiplier": 3.0}, 2.0, False),  # a note: same layout, new value
    ],
)
def test_a_changed_optimizer_layout_is_one_line_before_any_step(
    tmp_path: Path, saved: dict, now: float, fails: bool
) -> None:
    path = tmp_path / "joint.ckpt"
    torch.save({"hyper_parameters": {"prototypes": "joint", **saved}}, path)
    hparams = {"prototypes": "joint", "prototype_lr_multiplier": now}
    if fails:
        with pytest.raises(ValueError, match=r"model\.prototypes\.lr_multiplier") as error:
            check_resume_compatible(path, hparams, None, world_size=1)
        assert "\n" not in str(error.value)
    else:
        notes = check_resume_compatible(path, hparams, None, world_size=1)
        assert notes == ([] if not saved else ["model.prototypes.lr_multiplier: 3.0 -> 2.0"])
    # Decoupled prototypes are buffers: two groups whatever the multiplier. (A checkpoint of
    # the flat layout was written with the dense update, top_k's default then.)
    torch.save({"hyper_parameters": {"prototypes": "decoupled", **saved}}, path)
    dense = {"prototypes": "decoupled", "gmm": {"top_k": None}}
    check_resume_compatible(path, hparams | dense, None, world_size=1)


def test_a_checkpoint_of_the_flat_layout_resumes_into_todays_classes(tmp_path: Path) -> None:
    """Checkpoints written before the host and kind classes compare by their meaning."""
    path = tmp_path / "flat.ckpt"
    flat = {"host": "ibot", "prototypes": "joint", "ibot_patch_weight": 0.5, "koleo_weight": 0.1}
    flat |= {"carp_block_size": 128, "gmm": None}  # options of other hosts and kinds: dropped
    torch.save({"hyper_parameters": flat}, path)
    today = {
        "host": IBOT(patch_weight=0.5).spec(),
        "prototypes": Joint(koleo_weight=0.1).spec(),
    }
    assert check_resume_compatible(path, today, None, world_size=1) == []
    notes = check_resume_compatible(
        path, today | {"host": IBOT(patch_weight=1.0).spec()}, None, world_size=1
    )
    assert notes == ["model.host.patch_weight: 0.5 -> 1.0"]
    with pytest.raises(ValueError, match=r"model\.host is 'IBOT' in the checkpoint but 'DINO'"):
        check_resume_compatible(path, today | {"host": DINO().spec()}, None, world_size=1)


TORCHRUN_2_PER_NODE = {
    "RANK": "0",
    "GROUP_RANK": "0",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "WORLD_SIZE": "4",
}


def test_inconsistent_process_layouts_are_one_line_errors() -> None:
    env = TORCHRUN_2_PER_NODE
    assert check_launch("auto", 2, "cpu", env) == 2
    assert check_launch(2, 2, "cpu", env) == 2
    with pytest.raises(ValueError, match=r"trainer.devices=1 but torchrun started 2 processes"):
        check_launch(1, 2, "cpu", env)
    with pytest.raises(ValueError, match=r"trainer.num_nodes=1 x 2 .* world size is 4"):
        check_launch("2", 1, "cpu", env)
    with pytest.raises(ValueError, match=r"trainer.devices=4 but this machine has 1 CUDA"):
        check_launch(4, 1, "gpu", {}, cuda_devices=1)
    assert check_launch([0, 1], 1, "gpu", {}, cuda_devices=2) == [0, 1]
    assert check_launch(3, 1, "cpu", {}) == 3  # no launcher: Lightning starts 3 processes


def test_fit_under_torchrun_with_the_wrong_devices_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in TORCHRUN_2_PER_NODE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["protogmm"])
    run_dir = tmp_path / "run"
    code, lines = fit_cli(capsys, f"--trainer.default_root_dir={run_dir}", "--trainer.devices=2")
    assert code == 2 and len(lines) == 1, lines
    assert (
        "trainer.num_nodes=1 x 2 processes per node = 2, but torchrun's world size is 4" in lines[0]
    )
    assert not run_dir.exists()


def test_bad_fit_options_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["protogmm"])
    root = f"--trainer.default_root_dir={tmp_path / 'run'}"
    for option, culprit in (
        ("--on_nonfinite=maybe", "on_nonfinite"),
        ("--checkpoint_every_n_steps=-1", "checkpoint_every_n_steps"),
        (f"--ckpt_path={tmp_path / 'missing.ckpt'}", "checkpoint not found"),
    ):
        code, lines = fit_cli(capsys, root, option)
        assert code == 2 and len(lines) == 1 and culprit in lines[0], (option, lines)
