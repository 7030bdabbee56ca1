"""Crash safety and exact resume: what protogmm adds to Lightning's checkpointing.

* :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in the target
  folder, flushed and fsync'ed, then renamed over the target (``os.replace``) and the folder
  fsync'ed: a kill or a power cut during a save leaves the previous ``last.ckpt`` whole.
  Reads are ``weights_only=True`` always.
* :class:`ResumableDataLoader` and :class:`ResumableDistributedSampler`: the data position
  (epoch, batches consumed) is part of the checkpoint, through Lightning's stateful-loader
  protocol, so a run resumed from a mid-epoch checkpoint sees exactly the batches the
  uninterrupted run would have seen next.
* :class:`NonFiniteGuard`: a non-finite input batch, teacher embedding, loss or mixture
  statistic stops the run before the optimizer step (so nothing non-finite is ever saved),
  with a message naming what and at which step; or, with ``action="skip"``, the step is
  skipped and counted.
* :func:`check_resume_compatible`: a checkpoint from another configuration (K, d, host,
  prototype kind, ...) or another process layout is a one-line error before any step.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from protogmm._checks import check_choice, check_positive_int
from protogmm.integrity import check_checkpoint_integrity
from protogmm.training.distributed import CHECKPOINT_KEY, SYNCHRONISED_MODULES

NonFiniteAction = Literal["stop", "skip"]


# ---------------------------------------------------------------------- atomic checkpoints
def process_alive(pid: int) -> bool:
    """Whether a process of this host with this PID exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial checkpoint at the target path.

    ``save_checkpoint`` serialises straight into ``.<name>.<pid>.tmp`` next to the target
    (no second copy of the checkpoint in memory), fsyncs it, renames it over the target and
    fsyncs the folder. Temporary files of writers that died (their process is gone) are
    removed before the next save of the same target. Remote paths (``s3://`` ...) go to
    Lightning's own fsspec transaction.

    ``load_checkpoint`` always reads with ``weights_only=True``: protogmm checkpoints hold only
    tensors and plain containers, and nothing pickled is ever executed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries(target)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                self.write(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as error:  # e.g. a full disk: named by the checkpoint, not the temporary
            temporary.unlink(missing_ok=True)
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(target)) from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file (tests override this)."""
        torch.save(checkpoint, handle)

    @staticmethod
    def _remove_stale_temporaries(target: Path) -> None:
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.tmp$")
        for candidate in target.parent.glob(f".{target.name}.*.tmp"):
            match = pattern.match(candidate.name)
            if match and not process_alive(int(match.group(1))):
                candidate.unlink(missing_ok=True)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location)


def read_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Args:
        path: a checkpoint file.
        map_location: as for :func:`torch.load`.
        mmap: map the tensors instead of reading them (for looking at the metadata only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights-only checkpoint (corrupt, truncated or foreign), or its
            bytes fail the archive's own CRC-32 checks (:mod:`protogmm.integrity`).
    """
    if "://" not in str(path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        check_checkpoint_integrity(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 (any unpickling failure: one line naming the file)
        raise ValueError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a training checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


# ---------------------------------------------------------------------- resumable data
class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can resume an epoch after its first ``n`` indices.

    The order is the parent's: a function of (seed, epoch, rank, world size) only. ``len``
    stays the full epoch's, which is what Lightning's loop counts a resumed epoch against.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Indices to leave out at the start of the next iteration (a resumed epoch).
        self.skip_indices = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip_indices = self.skip_indices, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader whose position (epoch, batches handed to the training loop) is checkpointed.

    Lightning saves ``state_dict()`` with the fit loop; on resume the position comes back
    through ``load_state_dict()`` (from Lightning, or from :class:`DataPosition` when
    Lightning set the loader up before restoring its loops). The next iteration of the saved
    epoch then skips the batches already trained on (by index, without loading them); an
    end-of-epoch position just lets the next epoch start. Only batches handed out are
    counted, so worker prefetching does not shift the position.

    The underlying iterator is created at the first ``next()``, when Lightning has set the
    sampler's epoch and delivered the position (it calls ``iter()`` earlier). Creating it
    draws a worker base seed from the global RNG; the uninterrupted run drew it at the start
    of the epoch, so a mid-epoch resume puts the RNG back after the draw.

    Requires a :class:`ResumableDistributedSampler` as ``sampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableDistributedSampler):
            raise ValueError(
                "ResumableDataLoader needs a ResumableDistributedSampler, got "
                f"{type(self.sampler).__name__}"
            )
        self.position = {"epoch": 0, "batches": 0}
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "batches_per_epoch"}`` of the training loop's position."""
        return {**self.position, "batches_per_epoch": len(self)}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def _start_epoch(self) -> Iterator[Any]:
        """The real iterator of the current epoch, resumed at the saved position if any."""
        epoch, skip = int(getattr(self.sampler, "epoch", 0)), 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            skip = min(self._resume_at[1], len(self))
        self._resume_at = None
        self.position = {"epoch": epoch, "batches": skip}
        if skip == 0:
            return DataLoader.__iter__(self)
        self.sampler.skip_indices = skip * self.batch_size
        rng = torch.get_rng_state()
        iterator = DataLoader.__iter__(self)
        torch.set_rng_state(rng)
        return iterator


class _CountingIterator(Iterator[Any]):
    """Creates the loader's iterator at the first ``next()`` and counts the batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start_epoch()
        batch = next(self.iterator)
        self.loader.position["batches"] += 1
        return batch


class DataPosition(L.Callback):
    """Delivers a checkpoint's data position to :class:`ResumableDataLoader` on resume.

    Lightning loads a stateful loader's state only if it sets the loader up after restoring
    its loops; anything that asks for ``trainer.estimated_stepping_batches`` in
    ``on_fit_start`` (our module does, for the annealing) makes it set the loader up before,
    and the position would be lost. This callback keeps the saved position and hands it to
    the loader at ``on_train_start``, before the first batch is drawn.
    """

    def __init__(self) -> None:
        self._saved: list[dict[str, int]] = []

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved = list(_loader_states(checkpoint))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self._saved = self._saved, []
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        resumable = [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]
        for loader, state in zip(resumable, saved, strict=False):
            loader.load_state_dict(state)


# ---------------------------------------------------------------------- non-finite guard
class NonFiniteError(RuntimeError):
    """Training produced (or was fed) a non-finite value; the message says what and when."""


def _nonfinite_counts(tensor: Tensor) -> tuple[int, int]:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return nan, inf


def _describe_nonfinite(named: Mapping[str, Tensor]) -> str | None:
    """``"name: 3 NaN, 0 Inf; ..."`` for the non-finite floating tensors, None if all finite."""
    parts = []
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            continue
        if bool(torch.isfinite(tensor).all()):
            continue
        nan, inf = _nonfinite_counts(tensor)
        parts.append(f"{name}: {nan} NaN, {inf} Inf of {tensor.numel()}")
    return "; ".join(parts) if parts else None


def _batch_tensors(batch: Any, prefix: str = "batch") -> dict[str, Tensor]:
    """Every tensor of a (nested) batch, by its index path (``batch[0][1]``)."""
    if isinstance(batch, Tensor):
        return {prefix: batch}
    found: dict[str, Tensor] = {}
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            found.update(_batch_tensors(value, f"{prefix}[{key!r}]"))
    elif isinstance(batch, (list, tuple)):
        for index, value in enumerate(batch):
            found.update(_batch_tensors(value, f"{prefix}[{index}]"))
    return found


class NonFiniteGuard(L.Callback):
    """Stops (default) or skips a training step that meets a non-finite value.

    Checked at three points of every step:

    1. the input batch, before anything runs (a corrupt sample is the usual cause);
    2. the teacher's embeddings (a forward hook on the teacher's head), before they change
       the mixture or the centre; always stops: a teacher that produces them from finite
       input has diverged, and its BatchNorm statistics may already hold them;
    3. the loss and every buffer of the mixture and the centre, before backward; non-finite
       mixture or centre statistics always stop (they cannot be rolled back).

    Checks 1 and 3 are agreed across ranks (one all-reduce of one or two numbers each), so
    under DDP every rank skips or stops together; check 2 stops the rank that sees it.

    ``action="stop"`` raises :class:`NonFiniteError` naming what went non-finite, the step
    and the last checkpoint (which holds only finite state, since nothing non-finite ever
    reached an optimizer step). ``action="skip"`` skips a step whose input batch or loss is
    non-finite: no optimizer update and no teacher update (a non-finite input never reaches
    the model; for a non-finite loss the mixture, the centre and the BatchNorm statistics
    keep this step's finite statistics). Skipped steps are counted
    (``guard/skipped_steps`` in the metrics, a warning at the end, the checkpoint's callback
    state) and the run stops after ``max_consecutive_skips`` skips in a row.

    Args:
        action: ``"stop"`` or ``"skip"``.
        max_consecutive_skips: ``action="skip"`` only: stop after this many skipped steps in
            a row (a run that only produces non-finite steps should not idle on).
    """

    def __init__(self, action: NonFiniteAction = "stop", max_consecutive_skips: int = 20) -> None:
        self.action = check_choice("on_nonfinite", action, ("stop", "skip"))
        self.max_consecutive_skips = check_positive_int(
            "max_consecutive_skips", max_consecutive_skips
        )
        self.skipped_steps: list[int] = []
        #: True while the current step is being skipped (read by the module's step).
        self.skip_step = False
        self._consecutive = 0
        self._trainer: L.Trainer | None = None
        self._hook: Any = None

    # -------------------------------------------------------------- wiring
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        pl_module.step_guard = self
        teacher = getattr(pl_module, "teacher", None)
        if isinstance(teacher, torch.nn.ModuleDict) and "head" in teacher:
            self._hook = teacher["head"].register_forward_hook(self._check_teacher_embeddings)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "step_guard", None) is self:
            pl_module.step_guard = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._trainer = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = [int(step) for step in state_dict.get("skipped_steps", [])]

    # -------------------------------------------------------------- the three checks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.skip_step = False
        problem = _describe_nonfinite(_batch_tensors(batch))
        if self._any_rank(trainer, pl_module, problem is not None):
            self._stop_or_skip(trainer, "input batch", problem, skippable=True)

    def _check_teacher_embeddings(self, module: Any, inputs: Any, output: Any) -> None:
        """Forward hook of the teacher's head: its embeddings must be finite.

        Runs inside the step, before the embeddings reach the mixture or the centre. Local
        to the rank (a collective inside a forward would be fragile): under DDP the failing
        rank stops, and the launcher (torchrun, Lightning) ends the others.
        """
        trainer = self._trainer
        if trainer is None or not isinstance(output, Tensor):
            return
        problem = _describe_nonfinite({"teacher embeddings": output.detach()})
        if problem is not None:
            self._stop_or_skip(trainer, "teacher embeddings", problem, skippable=False)

    @staticmethod
    def skipped_step_loss(pl_module: L.LightningModule) -> Tensor:
        """The loss a skipped step returns: zero, with a gradient path to every parameter.

        Lightning does not let a distributed step return no loss, and DDP expects a
        gradient for every trainable parameter; the zero gradients are then dropped
        (:meth:`on_before_optimizer_step`), so the optimizer moves nothing.
        """
        trainable = [param.sum() for param in pl_module.parameters() if param.requires_grad]
        return torch.stack(trainable).sum() * 0.0

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        state = {
            f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in pl_module.named_modules()
            if isinstance(module, SYNCHRONISED_MODULES)
            for name, buffer in module.named_buffers()
        }
        state_problem = _describe_nonfinite(state)
        loss_problem = _describe_nonfinite({"loss": loss.detach()})
        state_bad, loss_bad = self._any_rank(
            trainer, pl_module, state_problem is not None, loss_problem is not None
        )
        if state_bad:
            self._stop_or_skip(trainer, "mixture/centre statistics", state_problem, skippable=False)
        if loss_bad:
            self._stop_or_skip(trainer, "loss", loss_problem, skippable=True)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.skip_step:
            return
        # No gradient, no update: AdamW leaves parameters without .grad (and their state) alone.
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not self.skip_step:
            self._consecutive = 0
        pl_module.log(
            "guard/skipped_steps", float(len(self.skipped_steps)), on_step=True, on_epoch=False
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped_steps:
            shown = ", ".join(str(step) for step in self.skipped_steps[:20])
            more = " ..." if len(self.skipped_steps) > 20 else ""
            rank_zero_warn(
                f"protogmm: skipped {len(self.skipped_steps)} non-finite step(s) "
                f"(steps {shown}{more})"
            )

    # -------------------------------------------------------------- decisions
    @staticmethod
    def _any_rank(trainer: L.Trainer, pl_module: L.LightningModule, *flags: bool) -> Any:
        """Each flag OR-ed over ranks (one all-reduce of a few numbers under DDP)."""
        values = [bool(flag) for flag in flags]
        if trainer.world_size > 1:
            counts = torch.tensor([float(v) for v in values], device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            values = [bool(c > 0) for c in counts.tolist()]
        return values[0] if len(values) == 1 else tuple(values)

    def _stop_or_skip(
        self, trainer: L.Trainer, what: str, detail: str | None, *, skippable: bool
    ) -> None:
        step = trainer.global_step
        where = detail if detail is not None else "on another rank"
        if trainer.world_size > 1 and detail is not None:
            where = f"rank {trainer.global_rank}: {detail}"
        if self.action == "skip" and skippable:
            self._consecutive += 1
            if self._consecutive <= self.max_consecutive_skips:
                if not self.skip_step:
                    self.skipped_steps.append(step)
                self.skip_step = True
                return
            raise NonFiniteError(
                f"step {step}: non-finite {what} ({where}) after {self.max_consecutive_skips} "
                f"skipped steps in a row; stopped. {self._last_checkpoint(trainer)}"
            )
        raise NonFiniteError(
            f"step {step}: non-finite {what} ({where}); stopped before the optimizer step. "
            f"{self._last_checkpoint(trainer)}"
        )

    @staticmethod
    def _last_checkpoint(trainer: L.Trainer) -> str:
        paths = [
            callback.last_model_path or callback.best_model_path
            for callback in trainer.callbacks
            if isinstance(callback, ModelCheckpoint)
        ]
        paths = [path for path in paths if path]
        return f"Last good checkpoint: {paths[0]}" if paths else "No checkpoint was written yet."


# ---------------------------------------------------------------------- resume checks
#: Model settings that define the checkpoint's state layout or the method itself. A resumed
#: run must have the checkpoint's values (compared when both sides have the key).
STRUCTURAL_KEYS = (
    "host",
    "prototypes",
    "num_prototypes",
    "bottleneck_dim",
    "hidden_dim",
    "head_layers",
    "head_bn",
    "backbone",
    "backbone_kwargs",
    "in_channels",
    "image_size",
    "targets",
    "gmm",
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=0, abs_tol=0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        a, b = dict(a or {}), dict(b or {})  # None and {} both mean "defaults"
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_resume_compatible(
    path: str | os.PathLike,
    model_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None,
    world_size: int,
) -> list[str]:
    """Check a checkpoint against the run about to resume from it, before any step.

    Args:
        path: the checkpoint (``--ckpt_path``).
        model_hparams: the new run's model hyperparameters.
        data_hparams: the new run's data-module hyperparameters (None: not checked).
        world_size: processes of the new run (devices x nodes).

    Returns:
        Notes on settings that differ but may (the run then is not an exact continuation),
        one line each.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the first mismatch: a structural model setting (see
            :data:`STRUCTURAL_KEYS`), or a mid-epoch checkpoint resumed with another process
            layout or per-device batch (its data position would be meaningless).
    """
    checkpoint = read_checkpoint(path, mmap=True)
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, Mapping):
        raise ValueError(f"{path}: not a protogmm training checkpoint (no hyper_parameters)")
    for key in STRUCTURAL_KEYS:
        if key in saved and key in model_hparams and not _same(saved[key], model_hparams[key]):
            raise ValueError(
                f"--ckpt_path {path}: model.{key} is {saved[key]!r} in the checkpoint but "
                f"{model_hparams[key]!r} in this run"
            )
    _check_optimizer_layout(path, saved, model_hparams)
    notes = [
        f"model.{key}: {saved[key]!r} -> {model_hparams[key]!r}"
        for key in sorted(set(saved) & set(model_hparams))
        if key not in STRUCTURAL_KEYS and not _same(saved[key], model_hparams[key])
    ]
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    if data_hparams is not None:
        notes += [
            f"data.{key}: {saved_data[key]!r} -> {data_hparams[key]!r}"
            for key in sorted(set(saved_data) & set(data_hparams))
            if not _same(saved_data[key], data_hparams[key])
        ]
    saved_world = int((checkpoint.get(CHECKPOINT_KEY) or {}).get("world_size", 1))
    position = _loader_position(checkpoint)
    if position is not None and 0 < position["batches"] < position["batches_per_epoch"]:
        saved_batch = saved_data.get("batch_size")
        batch = (data_hparams or {}).get("batch_size", saved_batch)
        if saved_world != world_size or saved_batch != batch:
            raise ValueError(
                f"--ckpt_path {path}: written mid-epoch by {saved_world} process(es) x "
                f"{saved_batch} images, resumed with {world_size} x {batch}: resume with the "
                "same layout or from an end-of-epoch checkpoint"
            )
    elif saved_world != world_size:
        notes.append(f"processes: {saved_world} -> {world_size}")
    return notes


def _check_optimizer_layout(
    path: str | os.PathLike, saved: Mapping[str, Any], model_hparams: Mapping[str, Any]
) -> None:
    """Raise if the saved optimizer state cannot load into this run's optimizer groups.

    ``prototype_lr_multiplier != 1`` gives learned prototypes a third group
    (:meth:`PrototypicalSSL.configure_optimizers`); a multiplier changed to or from 1 would
    fail in the optimizer's own ``load_state_dict`` after the run started. A checkpoint from
    before the option counts as 1 (its two groups).
    """
    if saved.get("prototypes", model_hparams.get("prototypes")) == "decoupled":
        return  # buffers only: two groups whatever the multiplier
    before = saved.get("prototype_lr_multiplier", 1.0)
    after = model_hparams.get("prototype_lr_multiplier", 1.0)
    if (before != 1.0) != (after != 1.0):
        raise ValueError(
            f"--ckpt_path {path}: model.prototype_lr_multiplier is {before!r} in the checkpoint "
            f"but {after!r} in this run: a multiplier of 1 keeps 2 optimizer groups, any other "
            "value 3, so the saved optimizer state cannot load (keep it 1, or keep it not 1)"
        )


def _loader_states(checkpoint: Mapping[str, Any]) -> list[dict[str, int]]:
    """The saved :class:`ResumableDataLoader` states (Lightning's fit-loop entry)."""
    try:
        states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return []
    keys = {"epoch", "batches", "batches_per_epoch"}
    return [
        {key: int(value) for key, value in state.items()}
        for state in states or []
        if isinstance(state, Mapping) and keys <= set(state)
    ]


def _loader_position(checkpoint: Mapping[str, Any]) -> dict[str, int] | None:
    """The first saved :class:`ResumableDataLoader` state, if the checkpoint has one."""
    states = _loader_states(checkpoint)
    return states[0] if states else None
