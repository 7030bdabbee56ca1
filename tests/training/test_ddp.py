"""Two processes (gloo on CPU) under torchrun: one mixture, one centre, one model.

Each test launches this file under ``torchrun --standalone --nproc_per_node=2`` in its own
session with a hard timeout (a hang fails instead of blocking), lets every rank write what
it holds, and compares in pytest:

* after k steps the GMM buffers, the DINO centre and the student's (and teacher's)
  weights are bit-identical on the two ranks, and equal, within float tolerance, to one
  process that trains on the same global batches (models without BatchNorm, whose batch
  statistics are per rank without SyncBatchNorm, which gloo lacks);
* the non-finite guard decides together: a NaN on one rank skips the step on both;
* the real data module and run callbacks: disjoint shards, per-rank augmentation streams,
  one checkpoint with every rank's RNG state, the same k-NN numbers on every rank;
* (slow) a DDP run resumed mid-epoch equals the uninterrupted one on every rank, also with
  2 loader workers per rank (each rank's workers resume their own augmentation streams).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import (
    TINY_FIT,
    TINY_MODEL,
    TINY_SHAPES,
    child_environment,
    fit_tiny,
    tiny_data,
)
from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.training.distributed import DistributedRun, synchronised_state
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import NonFiniteGuard, read_checkpoint

# Multi-process launches run one at a time on one xdist worker (pyproject's --dist
# loadgroup): two launches at once on two cores compete for free ports and CPU.
pytestmark = pytest.mark.xdist_group("multiprocess")

WORLD = 2
PER_RANK = 8  # images per rank and step
STEPS = 3
#: One process vs two: summation order only (relative to 1 + |value|).
FLOAT_TOLERANCE = 1e-5

BATCH_NORM_FREE = TINY_SHAPES | {
    "backbone": "convnet",
    "backbone_kwargs": {"width": 8, "norm": "none"},
    "head_bn": False,
    "lr": 0.001,
    "warmup_epochs": 0.0,
    "freeze_prototypes_epochs": 0.0,
}
#: The compared variants: DINO targets on the mixture, the mixture's posterior balanced by
#: Sinkhorn-Knopp (all-reduced column sums), joint prototypes, and CARP (all-reduced block
#: assignments) on the mixture.
VARIANTS = {
    "decoupled": {"prototypes": "decoupled"},
    "posterior-sinkhorn": {
        "prototypes": "decoupled",
        "targets": "posterior",
        "target_balancing": "sinkhorn",
    },
    "joint": {"prototypes": "joint"},
    "carp": {"host": "carp", "prototypes": "decoupled", "carp_block_size": 8},
    # Split and merge (on by default; here about half of the components count as stranded
    # at every step): every rank gathers the global batch's candidates, so the ranks plan the
    # moves one process would.
    "decoupled-reseed": {"prototypes": "decoupled", "gmm": {"reseed_min_share": 1.0}},
}
ALL_VARIANTS = VARIANTS


# ---------------------------------------------------------------------- shared by both sides
def fixed_inputs(path: Path) -> None:
    """Initial models (mixture already fitted) and the global batches of every step."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        views = [torch.randn(WORLD * PER_RANK, 1, 16, 16, generator=generator) for _ in range(2)]
        views += [torch.randn(WORLD * PER_RANK, 1, 8, 8, generator=generator) for _ in range(2)]
        batches.append(views)
    models = {}
    for kind, variant in ALL_VARIANTS.items():
        torch.manual_seed(0)
        model = PrototypicalSSL.from_hparams(variant | BATCH_NORM_FREE)
        if model.gmm is not None:
            # Fitted before training on the same embeddings everywhere: the comparison is
            # about the online updates (rank 0 alone seeds a fresh mixture under DDP).
            model.gmm.update(torch.randn(256, 16, generator=generator))
        models[kind] = model.state_dict()
    torch.save({"batches": batches, "models": models}, path)


def sinkhorn_logits() -> torch.Tensor:
    """``[32, 8]`` logits; rows 16-31 (rank 1's) are shifted up by 5."""
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(3)) * 3
    logits[16:] += 5.0
    return logits


class FixedBatches(L.LightningDataModule):
    """This rank's slice of fixed global batches (``poison``: NaN in a rank's slice)."""

    def __init__(
        self, batches: list[list[torch.Tensor]], rank: int, world: int, poison: tuple | None
    ) -> None:
        super().__init__()
        per_rank = batches[0][0].shape[0] // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self.items = []
        for step, views in enumerate(batches):
            views = [view.clone() for view in views]
            if poison is not None and poison[0] == step:
                poisoned_row = poison[1] * PER_RANK  # first image of that rank's slice
                views[0][poisoned_row].fill_(float("nan"))
            views = [view[rows] for view in views]
            self.items.append((views, torch.zeros(per_rank, dtype=torch.long)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=None, shuffle=False)


def fixed_batch_fit(
    inputs: dict[str, Any], kind: str, world: int, rank: int, poison: tuple | None = None
) -> tuple[PrototypicalSSL, NonFiniteGuard]:
    """``STEPS`` steps on the fixed batches, on ``world`` processes (1: the reference)."""
    model = PrototypicalSSL.from_hparams(ALL_VARIANTS[kind] | BATCH_NORM_FREE)
    model.load_state_dict(inputs["models"][kind])
    guard = NonFiniteGuard("skip")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[guard, DistributedRun()],
    )
    trainer.fit(model, datamodule=FixedBatches(inputs["batches"], rank, world, poison))
    return model, guard


def state_of(model: PrototypicalSSL) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in synchronised_state(model).items()}


def synthetic_fit(run_dir: Path, **kwargs: Any) -> tuple[PrototypicalSSL, L.Trainer]:
    """The real path: SSLDataModule, build_trainer's callbacks, two processes."""
    crash_at, ckpt = kwargs.pop("crash_at", None), kwargs.pop("ckpt", None)
    workers = kwargs.pop("num_workers", 0)
    return fit_tiny(
        run_dir,
        TINY_MODEL | {"warmup_epochs": 0.5},
        tiny_data(batch_size=PER_RANK, num_workers=workers),
        ckpt_path=ckpt,
        crash_at_step=crash_at,
        devices=WORLD,
        strategy="ddp",
        deterministic=True,
        **kwargs,
    )


# ---------------------------------------------------------------------- the worker
def worker(out: Path, scenarios: list[str]) -> None:
    """Runs on every rank under torchrun; writes ``<scenario>-rank<r>.pt`` files."""
    rank = int(os.environ["RANK"])
    inputs = (
        torch.load(out / "inputs.pt", weights_only=True) if (out / "inputs.pt").exists() else {}
    )
    if "fixed" in scenarios:
        for kind in ALL_VARIANTS:
            model, _ = fixed_batch_fit(inputs, kind, WORLD, rank)
            torch.save(state_of(model), out / f"fixed-{kind}-rank{rank}.pt")
        # Sinkhorn-Knopp on this rank's rows of one logits matrix whose rank-1 half peaks
        # higher (each rank would otherwise shift its exponentials by a different max).
        logits = sinkhorn_logits()[rank * 16 : (rank + 1) * 16]
        torch.save(sinkhorn_knopp(logits), out / f"sinkhorn-rank{rank}.pt")
    if "skip" in scenarios:
        model, guard = fixed_batch_fit(inputs, "decoupled", WORLD, rank, poison=(1, 1))
        result = {"state": state_of(model), "skipped": torch.tensor(guard.skipped_steps)}
        torch.save(result, out / f"skip-rank{rank}.pt")
    if "synthetic" in scenarios:
        model, trainer = synthetic_fit(out / "run", max_epochs=1, checkpoint_every_n_steps=2)
        loader = trainer.train_dataloader
        loader.sampler.set_epoch(0)
        knn = next(c for c in trainer.callbacks if hasattr(c, "baselines"))
        result = {
            "state": state_of(model),
            "indices": torch.tensor(list(loader.sampler)),
            "knn": torch.tensor(
                [row["top1"] for row in knn.history] + list(knn.baselines.values())
            ),
        }
        torch.save(result, out / f"synthetic-rank{rank}.pt")
    # Killed at step 5 (resumed from epoch 0's end) / 7 (from step 6, mid-epoch 1).
    for scenario, workers, crash_at in (("resume", 0, 5), ("resume-workers", 2, 7)):
        if scenario in scenarios:
            run = out / scenario
            full, _ = synthetic_fit(run / "full", max_epochs=2, num_workers=workers)
            try:
                synthetic_fit(
                    run / "crashed",
                    max_epochs=2,
                    checkpoint_every_n_steps=3,
                    crash_at=crash_at,
                    num_workers=workers,
                )
            except RuntimeError as error:
                assert "simulated crash" in str(error)
            ckpt = run / "crashed" / "checkpoints" / "last.ckpt"
            resumed, _ = synthetic_fit(
                run / "resumed", max_epochs=2, ckpt=ckpt, num_workers=workers
            )
            torch.save(
                {"full": state_of(full), "resumed": state_of(resumed)},
                out / f"{scenario}-rank{rank}.pt",
            )


# ---------------------------------------------------------------------- the tests
def launch(out: Path, *scenarios: str, timeout: float = 420) -> None:
    """This file's worker on 2 processes; kills the whole session on timeout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        __file__,
        str(out),
        *scenarios,
    ]
    log = out / "torchrun.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command,
            env=child_environment(),  # the workers import helpers
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"2-process run hung (>{timeout}s): {log.read_text()[-3000:]}")
    assert process.returncode == 0, log.read_text()[-5000:]


def load(out: Path, name: str, rank: int) -> Any:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    """``|a - b| <= tol * (1 + |b|)`` elementwise (counts such as ``gmm.mix_count`` are large)."""
    assert a.keys() == b.keys()
    differences = {
        name: float(
            ((a[name].double() - b[name].double()).abs() / (1 + b[name].double().abs())).max()
        )
        for name in a
        if a[name].numel()
    }
    worst = max(differences, key=differences.get)
    assert differences[worst] <= tol, f"{worst} differs by {differences[worst]:.3g}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    fixed_inputs(out / "inputs.pt")
    launch(out, "fixed", "skip", "synthetic")
    return out


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_two_ranks_hold_one_model_equal_to_one_process(two_ranks: Path, kind: str) -> None:
    rank0, rank1 = (load(two_ranks, f"fixed-{kind}", rank) for rank in range(WORLD))
    assert_bit_identical(rank0, rank1)
    inputs = torch.load(two_ranks / "inputs.pt", weights_only=True)
    single, _ = fixed_batch_fit(inputs, kind, world=1, rank=0)
    reference = state_of(single)
    assert_close(rank0, reference, FLOAT_TOLERANCE)
    initial = inputs["models"][kind]
    moved = [
        name
        for name in reference
        if name in initial and not torch.equal(initial[name], reference[name])
    ]
    trained = {
        "decoupled": {"gmm.mean", "gmm.stat_sum", "host.objective.center"},
        "posterior-sinkhorn": {"gmm.mean", "gmm.stat_sum"},
        "joint": {"host.objective.center", "student.prototypes.weight"},
        "carp": {"gmm.mean", "gmm.stat_sum", "host.objective.num_partitions"},
        "decoupled-reseed": {"gmm.mean", "gmm.stat_sum", "gmm.num_reseeded"},
    }[kind]
    assert trained <= set(moved)  # the compared state did train
    assert any(name.startswith("student.backbone.") for name in moved)


def test_reseeding_keeps_one_mixture_on_every_rank(two_ranks: Path) -> None:
    rank0, rank1 = (load(two_ranks, "fixed-decoupled-reseed", rank) for rank in range(WORLD))
    # Different rows on each rank, yet the same stranded set (all-reduced counts) and the
    # same targets from the gathered global batch: one mixture, bit for bit.
    assert_bit_identical(rank0, rank1)
    inputs = torch.load(two_ranks / "inputs.pt", weights_only=True)
    assert int(rank0["gmm.num_reseeded"]) > 0
    initial = inputs["models"]["decoupled-reseed"]["gmm.mean"]
    moved = (rank0["gmm.mean"] - initial).norm(dim=1) > 1e-3
    assert int(moved.sum()) >= 1


def test_sinkhorn_balances_over_the_global_batch(two_ranks: Path) -> None:
    per_rank = [torch.load(two_ranks / f"sinkhorn-rank{r}.pt", weights_only=True) for r in (0, 1)]
    expected = sinkhorn_knopp(sinkhorn_logits())
    torch.testing.assert_close(torch.cat(per_rank), expected, atol=1e-6, rtol=1e-5)


def test_a_nan_on_one_rank_skips_the_step_on_both(two_ranks: Path) -> None:
    rank0, rank1 = (load(two_ranks, "skip", rank) for rank in range(WORLD))
    assert rank0["skipped"].tolist() == rank1["skipped"].tolist() == [1]
    assert_bit_identical(rank0["state"], rank1["state"])
    inputs = torch.load(two_ranks / "inputs.pt", weights_only=True)
    single, guard = fixed_batch_fit(inputs, "decoupled", world=1, rank=0, poison=(1, 1))
    assert guard.skipped_steps == [1]
    assert_close(rank0["state"], state_of(single), FLOAT_TOLERANCE)


def test_the_run_path_under_ddp(two_ranks: Path) -> None:
    rank0, rank1 = (load(two_ranks, "synthetic", rank) for rank in range(WORLD))
    assert_bit_identical(rank0["state"], rank1["state"])
    # Disjoint shards of one epoch's permutation, 4 batches of 8 each.
    assert len(rank0["indices"]) == len(rank1["indices"]) == 32
    assert not set(rank0["indices"].tolist()) & set(rank1["indices"].tolist())
    # Rank 0 measures k-NN and every rank logs its numbers.
    assert torch.equal(rank0["knn"], rank1["knn"]) and len(rank0["knn"]) == 5
    checkpoint = read_checkpoint(two_ranks / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    run = checkpoint["protogmm_run"]
    assert run["world_size"] == 2 and len(run["rng"]) == 2
    assert not torch.equal(run["rng"][0]["torch"], run["rng"][1]["torch"])  # own streams
    saved = {name: checkpoint["state_dict"][name] for name in rank0["state"]}
    assert_bit_identical(saved, rank0["state"])


CLI_FIT = [
    "fit",
    *TINY_FIT,
    f"--data.batch_size={PER_RANK}",
    "--trainer.max_epochs=1",
    "--trainer.accelerator=cpu",
]


def run_in_session(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout kill the session (every rank) and fail."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=child_environment(),  # one thread per process, as torchrun sets
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"hung (>{timeout}s): {output[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def fit_on_two_processes(tmp_path: Path, launcher: list[str], *devices: str) -> None:
    """``python -m LAUNCHER protogmm.cli fit ...`` with ``devices``: one epoch on two
    processes, written into one run folder."""
    run_dir = tmp_path / "run"
    result = run_in_session(
        [sys.executable, "-m", *launcher, "protogmm.cli", *CLI_FIT, *devices]
        + [f"--trainer.default_root_dir={run_dir}"],
        cwd=tmp_path,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["protogmm_run"]["world_size"] == 2
    assert checkpoint["global_step"] == 64 // (2 * PER_RANK)  # one epoch of 2 x 8 images
    for name in ("config.yaml", "metrics.csv", "summary.json", "report.md"):
        assert (run_dir / name).exists(), name


def test_fit_on_two_processes_with_lightnings_launcher(tmp_path: Path) -> None:
    fit_on_two_processes(tmp_path, [], "--trainer.devices=2", "--trainer.strategy=ddp")


@pytest.mark.slow
def test_fit_under_torchrun(tmp_path: Path) -> None:
    torchrun = ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    fit_on_two_processes(tmp_path, torchrun, "--trainer.devices=auto")  # --nproc_per_node's


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["resume", "resume-workers"])
def test_a_ddp_run_resumed_mid_epoch_equals_the_uninterrupted_one(
    tmp_path: Path, scenario: str
) -> None:
    launch(tmp_path, scenario, timeout=600)
    for rank in range(WORLD):
        result = load(tmp_path, scenario, rank)
        assert_close(result["resumed"], result["full"], 1e-6)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
