"""Mixed precision: the mixture and the losses' softmaxes stay in float32 under autocast.

CPU bfloat16 autocast stands in for ``bf16-mixed`` / ``16-mixed`` on GPU (the same autocast
machinery; Lightning maps ``16-mixed`` on CPU to ``bf16-mixed``). Inputs are tiny: bf16
kernels are slow on this CPU.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from helpers import TINY_MODEL, TINY_VIT, tiny_data, training_batch, without_a_trainer
from protogmm.objectives import DINOLoss
from protogmm.prototypes import OnlineGMM
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import NonFiniteGuard

#: 2 steps of 8 (the held-out half needs >= 10 images).
DATA = {"batch_size": 8, "synthetic": {"samples": 20}}


def bf16_autocast() -> torch.autocast:
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def test_the_mixture_ignores_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=generator)
    plain = OnlineGMM(32, 16)
    plain.update(h)  # fitted
    under_autocast = copy.deepcopy(plain)
    next_batch = torch.randn(64, 16, generator=generator)
    expected = plain.update(next_batch)
    with bf16_autocast():
        posterior = under_autocast.update(next_batch)
        scores = under_autocast(next_batch.bfloat16())
    assert posterior.dtype == torch.float32 and torch.equal(posterior, expected)
    for name, buffer in under_autocast.named_buffers():
        assert buffer.dtype == getattr(plain, name).dtype, name
        assert torch.equal(buffer, getattr(plain, name)), name
    assert under_autocast.mean.dtype == torch.float32
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, plain(next_batch.bfloat16().float()), atol=0, rtol=0)


def test_the_dino_softmaxes_run_in_float32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, 32, generator=generator).bfloat16()
    teacher = torch.randn(2, 8, 32, generator=generator).bfloat16()
    loss_fn = DINOLoss(32)
    with bf16_autocast():
        targets = loss_fn.teacher_distribution(teacher, 0.04)
        loss = loss_fn(student, teacher_probs=targets)
    assert targets.dtype == loss.dtype == torch.float32
    # Exactly the float32 computation on the same (bf16-rounded) scores.
    reference_targets = DINOLoss(32).teacher_distribution(teacher.float(), 0.04)
    assert torch.equal(targets, reference_targets)
    assert torch.equal(loss, DINOLoss(32)(student.float(), teacher_probs=reference_targets))


#: The dense update: continuous in the teacher's embeddings, so bf16's rounding moves it by
#: little. Truncated EM (the default) picks each row's components by score, and a rounding
#: can swap a candidate: test_a_bf16_truncated_step_keeps_the_mixture_in_float32.
DENSE = {"gmm": {"top_k": None}}


@pytest.mark.parametrize(
    ("host", "kind", "extra"),
    [
        ("dino", "decoupled", DENSE),
        ("dino", "joint", {}),
        ("carp", "decoupled", {"carp_block_size": 8} | DENSE),
        ("ibot", "decoupled", TINY_VIT | DENSE),
    ],
)
def test_a_bf16_training_step_matches_float32(host: str, kind: str, extra: dict) -> None:
    views, labels = training_batch(**DATA)
    torch.manual_seed(0)
    model = PrototypicalSSL.from_hparams({"host": host, "prototypes": kind, **(TINY_MODEL | extra)})
    if model.gmm is not None:  # fitted already: the step is an online update, not a seeding
        model.gmm.update(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
    bf16_model = without_a_trainer(copy.deepcopy(model))
    without_a_trainer(model)
    full = model.training_step((views, labels), 0)
    with bf16_autocast():
        mixed = bf16_model.training_step((views, labels), 0)
    assert full.dtype == mixed.dtype == torch.float32
    assert math.isfinite(float(mixed))
    # bf16 keeps 8 bits of mantissa: the backbone's activations move the loss by < 2 %.
    assert float(mixed) == pytest.approx(float(full), rel=0.02)
    for name, buffer in bf16_model.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
    if kind == "decoupled":
        torch.testing.assert_close(bf16_model.gmm.mean, model.gmm.mean, atol=0.01, rtol=0)


def test_a_bf16_truncated_step_keeps_the_mixture_in_float32() -> None:
    views, labels = training_batch(**DATA)
    torch.manual_seed(0)
    model = without_a_trainer(PrototypicalSSL.from_hparams(TINY_MODEL))
    assert model.gmm.top_k == 8  # the default
    model.gmm.update(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
    with bf16_autocast():
        loss = model.training_step((views, labels), 0)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32 and bool(buffer.isfinite().all()), name


def test_fit_with_bf16_mixed_keeps_the_mixture_in_float32(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    model = PrototypicalSSL(**TINY_MODEL)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NonFiniteGuard()],  # would stop on a non-finite loss or statistic
    )
    trainer.fit(model, datamodule=tiny_data(**DATA))
    assert trainer.global_step == 2 and model.gmm.step == 2
    for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
            assert bool(torch.isfinite(tensor).all()), name
