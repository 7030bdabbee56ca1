"""Exact resume: a run interrupted mid-epoch and resumed equals the uninterrupted run.

Deterministic CPU, tiny models on 16 px synthetic data (4 steps per epoch). The checkpoint
is written every 3 steps, so the resumed run starts 3 batches into epoch 0: it must
restore the model, the teacher, the optimizer, the schedules (functions of the step), the
mixture and the centre, the RNG streams and the data position. Once with the resume
machinery only (guard, data position, DDP bookkeeping, atomic IO), then with all of a run's
callbacks (the k-NN and collapse monitors, the report) for each prototype/target variant;
with 2 loader workers (their augmentation streams are part of the data position); and from
a checkpoint whose position was saved before the torchdata loader.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, TensorDataset

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
from protogmm.training.data_position import (
    is_mid_epoch,
    loader_position,
    resume_loader,
    sampler_position,
)
from protogmm.training.distributed import DistributedRun
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import (
    AtomicCheckpointIO,
    DataPosition,
    NonFiniteGuard,
    check_resume_compatible,
    training_loader,
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
    data: dict | None = None,
    extra: tuple[L.Callback, ...] = (),
) -> tuple[PrototypicalSSL, L.Trainer]:
    model = TINY_MODEL | HALF_EPOCH_WARMUP | model_kwargs
    if all_callbacks:
        return fit_tiny(
            run_dir,
            model,
            tiny_data(**(data or {})),
            ckpt_path=ckpt_path,
            crash_at_step=crash_at_step,
            max_epochs=2,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            callbacks=extra,
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
            *extra,
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
    trainer.fit(module, datamodule=tiny_data(**(data or {})), ckpt_path=ckpt_path)
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


class OldLoaderDraws(L.Callback):
    """The loader before torchdata (``ResumableDataLoader``) drew its worker seed from the
    global RNG as each epoch began: with this callback a run draws as that one did."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.empty((), dtype=torch.int64).random_()


def saved_position(checkpoint_path: Path) -> dict:
    """The sampler's part of the checkpoint's saved loader state (Lightning's entry)."""
    state = loader_position(torch.load(checkpoint_path, weights_only=True))
    assert state is not None
    return dict(sampler_position(state) or {})


@pytest.mark.parametrize(
    ("model_kwargs", "all_callbacks", "data"),
    [
        pytest.param(DECOUPLED, False, {}, id="decoupled-host"),
        pytest.param(DECOUPLED, True, {}, id="decoupled-host-all-callbacks"),
        pytest.param(POSTERIOR, True, {}, id="decoupled-posterior"),
        pytest.param(JOINT, True, {}, id="joint"),
        pytest.param(JOINT_OPTIONS, False, {}, id="joint-baseline-options"),
        pytest.param(DECOUPLED, False, {"num_workers": 2}, id="decoupled-host-2-workers"),
        pytest.param(DECOUPLED, False, "old-position", id="decoupled-host-old-checkpoint"),
    ],
)
def test_mid_epoch_resume_equals_the_uninterrupted_run(
    tmp_path: Path, model_kwargs: dict, all_callbacks: bool, data: dict | str
) -> None:
    # "old-position": a run of the loader before torchdata, resumed by today's.
    old_position = data == "old-position"
    data, old = ({}, (OldLoaderDraws(),)) if old_position else (data, ())
    full_model, full_trainer = fit(
        tmp_path / "full", model_kwargs, all_callbacks, data=data, extra=old
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Killed before epoch 0's last batch: the newest checkpoint is step 3's, mid-epoch
        # (a crash after the epoch's end would resume from the epoch-end last.ckpt).
        fit(
            tmp_path / "crashed",
            model_kwargs,
            all_callbacks,
            crash_at_step=3,
            data=data,
            extra=old,
        )
    checkpoint_path = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["global_step"] == 3  # 3 of epoch 0's 4 batches: mid-epoch
    assert saved_position(checkpoint_path) == {"yielded": 48, "epoch": 0, "samples_per_epoch": 64}
    assert is_mid_epoch(loader_position(checkpoint))
    if old_position:  # as ResumableDataLoader saved it, before the torchdata loader
        loops = checkpoint["loops"]["fit_loop"]["state_dict"]
        loops["combined_loader"] = [{"epoch": 0, "batches": 3, "batches_per_epoch": 4}]
        torch.save(checkpoint, checkpoint_path)
        model, data_hparams = (
            checkpoint["hyper_parameters"],
            checkpoint["datamodule_hyper_parameters"],
        )
        with pytest.raises(ValueError, match="mid-epoch by 1 process"):  # still read as mid-epoch
            check_resume_compatible(checkpoint_path, model, data_hparams, world_size=2)

    resumed_model, resumed_trainer = fit(
        tmp_path / "resumed", model_kwargs, all_callbacks, checkpoint_path, data=data
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


@pytest.mark.parametrize(
    ("model_kwargs", "data"),
    [
        pytest.param(DECOUPLED, {}, id="decoupled"),
        pytest.param(JOINT, {}, id="joint"),
        pytest.param(DECOUPLED, {"num_workers": 2}, id="decoupled-2-workers"),
    ],
)
def test_end_of_epoch_resume_equals_the_uninterrupted_run(
    tmp_path: Path, model_kwargs: dict, data: dict
) -> None:
    """The default cadence (last.ckpt at epoch ends): killed in epoch 1, resumed from the
    end of epoch 0 into the same folder. The resumed epoch must draw epoch 1's permutation
    (not a second one), log its steps under epoch 1, and end where the full run ends."""
    full_model, full_trainer = fit(
        tmp_path / "full", model_kwargs, True, checkpoint_every_n_steps=0, data=data
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            tmp_path / "run",
            model_kwargs,
            True,
            crash_at_step=6,
            checkpoint_every_n_steps=0,
            data=data,
        )
    checkpoint_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 4)  # end of epoch 0
    assert saved_position(checkpoint_path) == {"yielded": 64, "epoch": 0, "samples_per_epoch": 64}

    resumed_model, resumed_trainer = fit(
        tmp_path / "run", model_kwargs, True, checkpoint_path, checkpoint_every_n_steps=0, data=data
    )

    full_rows, resumed_rows = logged_steps(tmp_path / "full"), logged_steps(tmp_path / "run")
    assert [row[:2] for row in resumed_rows] == [row[:2] for row in full_rows]  # step, epoch
    assert [row[:2] for row in full_rows] == [(s, s // 4) for s in range(8)]
    for (step, _, full_loss), (_, _, resumed_loss) in zip(full_rows, resumed_rows, strict=True):
        assert resumed_loss == pytest.approx(full_loss, abs=1e-6, rel=0), step
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, atol=1e-6, rtol=0, msg=name)
    assert saved_position(checkpoint_path) == {"yielded": 64, "epoch": 1, "samples_per_epoch": 64}
    assert resumed_trainer.global_step == full_trainer.global_step == 8


class Augmented(Dataset):
    """Index ``i`` -> ``(i, a random draw)``: the draw stands for an augmentation."""

    def __len__(self) -> int:
        return 42

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(torch.rand(()))


def loader(num_workers: int, seed: int = 3):  # noqa: ANN201 (a StatefulDataLoader)
    """Rank 1 of 2: 21 images each, 5 whole batches of 4 an epoch."""
    return training_loader(
        Augmented(), batch_size=4, num_workers=num_workers, seed=seed, rank=1, world_size=2
    )


def batches(iterator, count: int | None = None) -> list[tuple[list[int], list[float]]]:  # noqa: ANN001
    taken = iterator if count is None else (next(iterator) for _ in range(count))
    return [(index.tolist(), draw.tolist()) for index, draw in taken]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_data_position_survives_a_new_loader(num_workers: int) -> None:
    torch.manual_seed(0)
    reference = loader(num_workers)
    reference.sampler.set_epoch(1)
    epoch = batches(iter(reference))
    assert len(epoch) == len(reference) == 5
    assert sorted(i for indices, _ in epoch for i in indices) != list(range(1, 41, 2))  # shuffled

    torch.manual_seed(0)
    interrupted = loader(num_workers)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    assert batches(iterator, 2) == epoch[:2]
    state, rng = interrupted.state_dict(), torch.get_rng_state()  # as a checkpoint holds them
    assert sampler_position(state) == {"yielded": 8, "epoch": 1, "samples_per_epoch": 20}
    assert is_mid_epoch(state)

    resumed = loader(num_workers)
    resume_loader(resumed, state)
    torch.manual_seed(1)  # the loader creates its iterator without the global RNG
    before = torch.get_rng_state()
    iterator = iter(resumed)  # Lightning calls iter() before it sets the epoch on resume
    assert torch.equal(torch.get_rng_state(), before)
    resumed.sampler.set_epoch(1)
    torch.set_rng_state(rng)  # the module restores the main process's RNG
    # Same images and, with workers too, the same augmentation draws.
    assert batches(iterator) == epoch[2:]
    assert len(resumed) == 5  # the loop counts the resumed epoch against its full length
    resumed.sampler.set_epoch(2)  # the next epoch starts from its beginning
    assert len(batches(iter(resumed))) == 5


def test_a_position_saved_before_the_torchdata_loader_resumes_the_same_batches() -> None:
    reference = loader(0)
    reference.sampler.set_epoch(1)
    indices = [batch[0].tolist() for batch in reference]
    resumed = loader(0)
    resume_loader(resumed, {"epoch": 1, "batches": 2, "batches_per_epoch": 5})
    iterator = iter(resumed)
    resumed.sampler.set_epoch(1)
    assert [batch[0].tolist() for batch in iterator] == indices[2:]
    assert not is_mid_epoch({"epoch": 1, "batches": 5, "batches_per_epoch": 5})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_finished_epochs_state_starts_the_next_epoch_whole(num_workers: int) -> None:
    # Lightning restores the state of an end-of-epoch checkpoint itself when max_steps is set.
    finished = loader(num_workers)
    finished.sampler.set_epoch(0)
    assert len(batches(iter(finished), 5)) == 5  # Lightning stops at the length
    state = finished.state_dict()
    assert sampler_position(state) == {"yielded": 20, "epoch": 0, "samples_per_epoch": 20}
    assert not is_mid_epoch(state)
    reference = loader(num_workers)
    reference.sampler.set_epoch(1)
    resumed = loader(num_workers)
    resume_loader(resumed, state)
    iterator = iter(resumed)
    resumed.sampler.set_epoch(1)
    assert [batch[0].tolist() for batch in iterator] == [batch[0].tolist() for batch in reference]


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
