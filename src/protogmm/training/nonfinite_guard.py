"""The non-finite guard: no NaN or Inf ever reaches an optimizer step or a checkpoint.

:class:`NonFiniteGuard` checks the input batch, the teacher's embeddings, the loss and the
mixture / centre statistics of every step; a non-finite value stops the run before the
optimizer step (so nothing non-finite is ever saved), with a message naming what and at
which step; or, with ``action="skip"``, the step is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from protogmm._checks import check_choice, check_positive_int
from protogmm.training.distributed import SYNCHRONISED_MODULES

NonFiniteAction = Literal["stop", "skip"]


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
        # A skip spans the whole optimizer step: under gradient accumulation a bad
        # micro-batch's gradients are already summed, so its step's later micro-batches
        # are skipped too (the module returns the skipped-step loss for them).
        if batch_idx % trainer.accumulate_grad_batches == 0:
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
            if self.skip_step:
                return  # this optimizer step is skipped already
            self._consecutive += 1
            if self._consecutive <= self.max_consecutive_skips:
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
