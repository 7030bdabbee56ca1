"""Gradient accumulation and DINO's per-parameter gradient clip.

Under ``accumulate_grad_batches = k`` a training step runs once per micro-batch and the
optimizer (and the teacher's EMA) once per k of them: the mixture's annealing must span the
run in micro-batches, a skipped step must stay skipped for all its micro-batches, and each
micro-batch draws its own masks. ``model.clip_grad`` is DINO's ``--clip_grad``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers import TINY_MODEL, TINY_SHAPES, TINY_VIT, fit_tiny, tiny_data
from protogmm.hosts import DINO, IBOT, StepContext
from protogmm.prototypes import OnlineGMM
from protogmm.training.module import PrototypicalSSL
from protogmm.training.nonfinite_guard import NonFiniteGuard
from protogmm.training.optimization import clip_each_parameter_

DECOUPLED = TINY_MODEL | {
    "prototypes": {"class_path": "Decoupled", "init_args": {"anneal_fraction": 1.0}}
}


def betas_of_a_fit(tmp_path: Path, accumulation: int, monkeypatch: pytest.MonkeyPatch) -> list:
    """The mixture's beta at each of its updates over a 2-epoch fit."""
    betas: list[float] = []
    update = OnlineGMM.update_and_score

    def recording(self: OnlineGMM, *args: Any, **kwargs: Any) -> Any:
        betas.append(self.beta)
        return update(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(OnlineGMM, "update_and_score", recording)
        fit_tiny(
            tmp_path / f"k{accumulation}",
            DECOUPLED,
            tiny_data(num_local_crops=0),
            accumulate_grad_batches=accumulation,
            max_epochs=2,
        )
    return betas


def test_the_annealing_spans_the_run_under_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # beta counts the mixture's updates (one per micro-batch), so at k = 2 it must follow
    # the same ramp over the same 8 updates as at k = 1; before the fix it reached 1 halfway.
    plain = betas_of_a_fit(tmp_path, 1, monkeypatch)
    accumulated = betas_of_a_fit(tmp_path, 2, monkeypatch)
    assert len(plain) == len(accumulated) == 8
    assert accumulated == pytest.approx(plain)
    assert accumulated[-1] < 1.0 and accumulated[0] < accumulated[-2]


class Finite(L.Callback):
    """Records, after every micro-batch, whether student and teacher are finite."""

    def __init__(self) -> None:
        self.finite: list[tuple[int, bool, bool]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        student = all(bool(torch.isfinite(p).all()) for p in module.student.parameters())
        teacher = all(bool(torch.isfinite(p).all()) for p in module.teacher.parameters())
        self.finite.append((trainer.global_step, student, teacher))


def test_a_skipped_step_stays_skipped_for_all_its_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Micro-batch 2 opens optimizer step 1 (k = 2) with a NaN loss (an fp16 overflow, say);
    # its NaN gradients are summed with those of micro-batch 3, so the whole step must be
    # dropped, the teacher's EMA included.
    step = PrototypicalSSL.training_step

    def nan_at_batch_2(self: PrototypicalSSL, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = step(self, batch, batch_idx)
        return loss * math.nan if batch_idx == 2 else loss

    monkeypatch.setattr(PrototypicalSSL, "training_step", nan_at_batch_2)
    finite = Finite()
    _, trainer = fit_tiny(
        tmp_path / "run",
        TINY_MODEL,
        tiny_data(num_local_crops=0),
        accumulate_grad_batches=2,
        on_nonfinite="skip",
        callbacks=[finite],
    )
    assert len(finite.finite) == 4
    assert all(student and teacher for _, student, teacher in finite.finite)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped_steps == [1]  # once, though two micro-batches belonged to it


def test_each_micro_batch_draws_its_own_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    masks: list[tuple[int, torch.Tensor]] = []
    draw = IBOT.masks

    def recording(self: IBOT, ctx: StepContext, count: int) -> torch.Tensor:
        drawn = draw(self, ctx, count)
        masks.append((ctx.step, drawn.clone()))
        return drawn

    monkeypatch.setattr(IBOT, "masks", recording)
    fit_tiny(
        tmp_path / "run",
        TINY_SHAPES | TINY_VIT | {"host": "ibot"},
        tiny_data(num_local_crops=0),
        accumulate_grad_batches=2,
    )
    assert len(masks) >= 4 and masks[0][0] == masks[1][0]  # two micro-batches of step 0
    assert not torch.equal(masks[0][1], masks[1][1])


def test_without_accumulation_the_step_seeds_are_unchanged() -> None:
    # The seed of micro-batch 0 is the hash of the key used before micro-batches existed,
    # so runs without accumulation (and their resumes) draw exactly as they did.
    host = DINO()
    ctx = StepContext(None, None, None, {}, step=7, rank=1)  # type: ignore[arg-type]
    before = hashlib.sha256(b"masks/0/1/7").digest()[:8]
    assert host.step_seed(ctx, "masks") == int.from_bytes(before, "little") >> 1
    later = StepContext(None, None, None, {}, step=7, rank=1, micro_batch=1)  # type: ignore[arg-type]
    assert host.step_seed(later, "masks") != host.step_seed(ctx, "masks")


def test_clip_each_parameter_is_dinos_clip_gradients() -> None:
    torch.manual_seed(0)
    params = [torch.zeros(5, requires_grad=True) for _ in range(3)] + [torch.zeros(2)]
    grads = [torch.randn(5) * scale for scale in (10.0, 0.1, 3.0)]
    for param, grad in zip(params, grads, strict=False):
        param.grad = grad.clone()
    clip_each_parameter_(params, 1.0)
    for param, grad in zip(params, grads, strict=False):
        # DINO's utils.clip_gradients: clip_coef = clip / (norm + 1e-6), applied if < 1.
        coefficient = 1.0 / (float(grad.norm()) + 1e-6)
        expected = grad * coefficient if coefficient < 1 else grad
        torch.testing.assert_close(param.grad, expected)
    assert params[3].grad is None


def test_model_clip_grad_caps_each_parameter_in_a_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The largest per-parameter gradient norm the optimizer steps with (the clip runs
    # inside the optimizer's closure, after the backward pass).
    largest: list[float] = []
    clip = PrototypicalSSL.configure_gradient_clipping

    def recording(self: PrototypicalSSL, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        clip(self, optimizer, **kwargs)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        largest.append(max(float(g.norm()) for g in grads if g is not None))

    monkeypatch.setattr(PrototypicalSSL, "configure_gradient_clipping", recording)
    fit_tiny(tmp_path / "run", TINY_MODEL | {"clip_grad": 1e-3})
    assert largest and max(largest) <= 1e-3 * (1 + 1e-5)
    with pytest.raises(ValueError, match=r"^model\.clip_grad"):
        PrototypicalSSL(**TINY_MODEL, clip_grad=0.0)
