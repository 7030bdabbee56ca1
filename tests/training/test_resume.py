"""Exact resume: a run interrupted mid-epoch and resumed equals the uninterrupted run.

Deterministic CPU, tiny models on 16 px synthetic data (4 steps per epoch). The checkpoint
is written every 3 steps, so the resumed run starts 3 batches into epoch 0: it must
restore the model, the teacher, the optimizer, the schedules (functions of the step), the
mixture and the centre, the RNG streams and the data position. Once with the resume
machinery only (guard, data position, DDP bookkeeping, atomic IO), then with all of a run's
callbacks (the k-NN and collapse monitors, the report) for each prototype/target variant.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from helpers import (
    HALF_EPOCH_WARMUP,
    STEP_BY_STEP,
    TINY_MODEL,
    CrashAtStep,
    fit_tiny,
    logged,
    metric_rows,
    tiny_data,
)
from protogmm.training.distributed import DistributedRun
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import (
    AtomicCheckpointIO,
    DataPosition,
    NonFiniteGuard,
    ResumableDataLoader,
    ResumableDistributedSampler,
)
from protogmm.training.run_logger import RunCSVLogger
from protogmm.training.runner import run_logger


def fit(
    run_dir: Path,
    model_kwargs: dict,
    all_callbacks: bool,
    ckpt_path: Path | None = None,
    crash_at_step: int | None = None,
    checkpoint_every_n_steps: int = 3,
) -> tuple[PrototypicalSSL, L.Trainer]:
    model = TINY_MODEL | HALF_EPOCH_WARMUP | model_kwargs
    if all_callbacks:
        return fit_tiny(
            run_dir,
            model,
            ckpt_path=ckpt_path,
            crash_at_step=crash_at_step,
            max_epochs=2,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            **STEP_BY_STEP,
        )
    # The resume machinery alone: no monitors, no report.
    L.seed_everything(0, verbose=False)
    module = PrototypicalSSL.from_hparams(model)
    crash = [CrashAtStep(crash_at_step)] if crash_at_step is not None else []
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=run_logger(run_dir),
        log_every_n_steps=1,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            *crash,
            NonFiniteGuard(),
            DistributedRun(),
            DataPosition(),
            ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=3),
        ],
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=tiny_data(), ckpt_path=ckpt_path)
    return module, trainer


def losses(run_dir: Path) -> dict[int, float]:
    return dict(logged(run_dir, "train/loss"))


DECOUPLED = {"prototypes": "decoupled"}
POSTERIOR = {"prototypes": "decoupled", "targets": "posterior", "target_balancing": "sinkhorn"}
JOINT = {"prototypes": "joint"}
#: The joint baseline's options: a third optimizer group, and schedules longer than the run.
JOINT_OPTIONS = JOINT | {
    "prototype_init_scale": 0.1,
    "prototype_lr_multiplier": 3.0,
    "schedule_steps": 20,
}


@pytest.mark.parametrize(
    ("model_kwargs", "all_callbacks"),
    [
        pytest.param(DECOUPLED, False, id="decoupled-host"),
        pytest.param(DECOUPLED, True, id="decoupled-host-all-callbacks"),
        pytest.param(POSTERIOR, True, id="decoupled-posterior"),
        pytest.param(JOINT, True, id="joint"),
        pytest.param(JOINT_OPTIONS, False, id="joint-baseline-options"),
    ],
)
def test_mid_epoch_resume_equals_the_uninterrupted_run(
    tmp_path: Path, model_kwargs: dict, all_callbacks: bool
) -> None:
    full_model, full_trainer = fit(tmp_path / "full", model_kwargs, all_callbacks)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Killed before epoch 0's last batch: the newest checkpoint is step 3's, mid-epoch
        # (a crash after the epoch's end would resume from the epoch-end last.ckpt).
        fit(tmp_path / "crashed", model_kwargs, all_callbacks, crash_at_step=3)
    checkpoint_path = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["global_step"] == 3  # 3 of epoch 0's 4 batches: mid-epoch
    position = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position == {"epoch": 0, "batches": 3, "batches_per_epoch": 4}

    resumed_model, resumed_trainer = fit(
        tmp_path / "resumed", model_kwargs, all_callbacks, checkpoint_path
    )

    full_losses, resumed_losses = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed_losses) == [3, 4, 5, 6, 7]
    for step, loss in resumed_losses.items():
        assert math.isfinite(loss)
        assert loss == pytest.approx(full_losses[step], abs=1e-6, rel=0), step
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert list(full_state) == list(resumed_state)
    for name, value in full_state.items():  # student, teacher, GMM buffers, centre
        torch.testing.assert_close(resumed_state[name], value, atol=1e-6, rtol=0, msg=name)
    full_optimizer = full_trainer.optimizers[0].state_dict()["state"]
    resumed_optimizer = resumed_trainer.optimizers[0].state_dict()["state"]
    for index, state in full_optimizer.items():
        for key, value in state.items():
            torch.testing.assert_close(
                resumed_optimizer[index][key], value, atol=1e-6, rtol=0, msg=f"{index}.{key}"
            )
    assert resumed_trainer.global_step == full_trainer.global_step == 8


def logged_steps(run_dir: Path) -> list[tuple[int, int, float]]:
    """(step, epoch, loss) of every training row of ``metrics.csv``."""
    return [
        (int(row["step"]), int(row["epoch"]), float(row["train/loss"]))
        for row in metric_rows(run_dir)
        if row.get("train/loss")
    ]


@pytest.mark.parametrize("model_kwargs", [DECOUPLED, JOINT], ids=["decoupled", "joint"])
def test_end_of_epoch_resume_equals_the_uninterrupted_run(
    tmp_path: Path, model_kwargs: dict
) -> None:
    """The default cadence (last.ckpt at epoch ends): killed in epoch 1, resumed from the
    end of epoch 0 into the same folder. The resumed epoch must draw epoch 1's permutation
    (not a second one), log its steps under epoch 1, and end where the full run ends."""
    full_model, full_trainer = fit(
        tmp_path / "full", model_kwargs, True, checkpoint_every_n_steps=0
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "run", model_kwargs, True, crash_at_step=6, checkpoint_every_n_steps=0)
    checkpoint_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 4)  # end of epoch 0
    position = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position == {"epoch": 0, "batches": 4, "batches_per_epoch": 4}

    resumed_model, resumed_trainer = fit(
        tmp_path / "run", model_kwargs, True, checkpoint_path, checkpoint_every_n_steps=0
    )

    full_rows, resumed_rows = logged_steps(tmp_path / "full"), logged_steps(tmp_path / "run")
    assert [row[:2] for row in resumed_rows] == [row[:2] for row in full_rows]  # step, epoch
    assert [row[:2] for row in full_rows] == [(s, s // 4) for s in range(8)]
    for (step, _, full_loss), (_, _, resumed_loss) in zip(full_rows, resumed_rows, strict=True):
        assert resumed_loss == pytest.approx(full_loss, abs=1e-6, rel=0), step
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, atol=1e-6, rtol=0, msg=name)
    saved = torch.load(checkpoint_path, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] == {
        "epoch": 1,
        "batches": 4,
        "batches_per_epoch": 4,
    }
    assert resumed_trainer.global_step == full_trainer.global_step == 8


def loader(num_workers: int, seed: int = 3) -> ResumableDataLoader:
    data = TensorDataset(torch.arange(40))
    sampler = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=seed)
    return ResumableDataLoader(data, batch_size=4, sampler=sampler, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_data_position_survives_a_new_loader(num_workers: int) -> None:
    reference = loader(num_workers)
    reference.sampler.set_epoch(1)
    epoch = [batch[0].tolist() for batch in reference]
    assert len(epoch) == len(reference) == 5

    interrupted = loader(num_workers)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert seen == epoch[:2]
    assert state == {"epoch": 1, "batches": 2, "batches_per_epoch": 5}

    resumed = loader(num_workers)
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # Lightning calls iter() before it sets the epoch on resume
    resumed.sampler.set_epoch(1)
    rng = torch.get_rng_state()
    assert [batch[0].tolist() for batch in iterator] == epoch[2:]
    # The uninterrupted run drew the worker base seed at the epoch's start, not mid-epoch.
    assert torch.equal(torch.get_rng_state(), rng)
    assert resumed.state_dict() == {"epoch": 1, "batches": 5, "batches_per_epoch": 5}
    assert len(resumed) == 5  # the loop counts the resumed epoch against its full length
    resumed.sampler.set_epoch(2)  # the next epoch starts from its beginning
    assert len([batch for batch in resumed]) == 5


def test_a_loader_needs_the_resumable_sampler() -> None:
    with pytest.raises(ValueError, match="ResumableDistributedSampler"):
        ResumableDataLoader(TensorDataset(torch.arange(4)), batch_size=2)


class _FallingKNN(L.LightningModule):
    """Two steps per epoch; logs a k-NN that only gets worse after epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).square().mean()

    def on_train_epoch_end(self) -> None:
        self.log("knn/top1", 0.9 - 0.1 * self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


def test_last_ckpt_is_the_last_epoch_even_when_knn_does_not_improve(tmp_path: Path) -> None:
    # Regression: with save_last on the k-NN-monitored checkpoint, Lightning 2.6 rewrote
    # last.ckpt only in epochs with a new best k-NN, so last.ckpt stayed at epoch 0 here.
    from protogmm.training.runner import run_callbacks

    checkpoints = [c for c in run_callbacks() if isinstance(c, ModelCheckpoint)]
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        callbacks=checkpoints,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_FallingKNN())
    written = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert written == ["best-knn-epoch=0-top1=0.9000.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)


def test_a_resume_into_the_crashed_run_keeps_its_whole_metrics_history(tmp_path: Path) -> None:
    fit(tmp_path / "full", DECOUPLED, True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "run", DECOUPLED, True, crash_at_step=3)  # mid-epoch checkpoint: step 3
    checkpoint_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint_path, weights_only=True)["global_step"] == 3
    fit(tmp_path / "run", DECOUPLED, True, checkpoint_path)

    rows = [row for row in metric_rows(tmp_path / "run") if row.get("train/loss")]
    steps = [int(row["step"]) for row in rows]
    assert steps == list(range(8))  # every step once: the crashed run's steps kept
    full = losses(tmp_path / "full")
    for row in rows:
        assert float(row["train/loss"]) == pytest.approx(full[int(row["step"])], abs=1e-6, rel=0)
    assert not (tmp_path / "run" / "metrics.csv.tmp").exists()


def test_rows_logged_after_the_checkpoint_are_replaced_by_the_resumed_run(tmp_path: Path) -> None:
    # A crash after step 5 with the checkpoint at step 3: steps 3-5 are logged again.
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss\n" + "".join(f"0,{s},{s}.5\n" for s in range(6))
    )
    writer = RunCSVLogger(save_dir=str(tmp_path), name="", version="").experiment
    assert (tmp_path / "metrics.csv").exists()  # nothing deleted before the first save
    writer.log_metrics({"train/loss": 30.0, "knn/top1": 0.5}, step=3)
    writer.log_metrics({"train/loss": 40.0}, step=4)
    writer.save()
    writer.log_metrics({"train/loss": 50.0}, step=5)
    writer.save()
    rows = metric_rows(tmp_path)
    assert [(row["step"], row["train/loss"]) for row in rows] == [
        ("0", "0.5"),
        ("1", "1.5"),
        ("2", "2.5"),
        ("3", "30.0"),
        ("4", "40.0"),
        ("5", "50.0"),
    ]
    assert rows[3]["knn/top1"] == "0.5" and rows[0]["knn/top1"] == ""  # new column, old rows
