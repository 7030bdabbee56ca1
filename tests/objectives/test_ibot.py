"""IBOTPatchLoss against an element-by-element float64 reference of Zhou et al. (2022)."""

from __future__ import annotations

import pytest
import torch
from references import log_softmax_row, softmax_row

from protogmm.objectives import IBOTPatchLoss


def _reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    center: list[float],
    tau_s: float,
    tau_t: float,
) -> float:
    """iBOT Eq. (3): per image the mean over masked patches of H(P_t, P_s), then images, views.

    ``student`` and ``teacher`` are dense ``[V, B, P, K]`` scores; an image with no masked
    patch contributes 0 (iBOT divides by ``max(1, #masked)``).
    """
    num_views, batch, num_patches, _ = student.shape
    view_total = 0.0
    for v in range(num_views):
        image_total = 0.0
        for b in range(batch):
            ce_sum, count = 0.0, 0
            for i in range(num_patches):
                if not masks[v, b, i]:
                    continue
                target = softmax_row(
                    [
                        (t - c) / tau_t
                        for t, c in zip(teacher[v, b, i].tolist(), center, strict=True)
                    ]
                )
                log_p = log_softmax_row([s / tau_s for s in student[v, b, i].tolist()])
                ce_sum += -sum(q * lp for q, lp in zip(target, log_p, strict=True))
                count += 1
            image_total += ce_sum / max(1, count)
        view_total += image_total / batch
    return view_total / num_views


@pytest.mark.parametrize(
    ("views", "batch", "patches", "k"), [(2, 3, 9, 5), (2, 4, 16, 7), (1, 2, 4, 3)]
)
@pytest.mark.parametrize(("tau_s", "tau_t"), [(0.1, 0.07), (0.2, 0.04)])
def test_patch_loss_matches_reference(
    views: int, batch: int, patches: int, k: int, tau_s: float, tau_t: float
) -> None:
    generator = torch.Generator().manual_seed(views * 1000 + batch * 10 + patches)
    student = torch.randn(views, batch, patches, k, generator=generator, dtype=torch.float64)
    teacher = torch.randn(views, batch, patches, k, generator=generator, dtype=torch.float64)
    masks = torch.rand(views, batch, patches, generator=generator) < 0.4
    masks[0, 0] = False  # one image without masked patches: contributes 0, still counted
    center = torch.randn(1, k, generator=generator, dtype=torch.float64) * 0.1
    loss_fn = IBOTPatchLoss(k, student_temperature=tau_s).double()
    loss_fn.center.copy_(center)
    targets = loss_fn.teacher_distribution(teacher[masks], tau_t)
    loss = loss_fn(student[masks], targets, masks)
    expected = _reference(student, teacher, masks, center[0].tolist(), tau_s, tau_t)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_only_masked_positions_matter_and_gradient_reaches_the_student_only() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 8, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 8, 6, generator=generator, requires_grad=True)
    masks = torch.rand(2, 3, 8, generator=generator) < 0.5
    loss_fn = IBOTPatchLoss(6)
    targets = torch.softmax(teacher / 0.07, dim=-1)
    loss = loss_fn(student[masks], targets[masks], masks)
    loss.backward()
    assert teacher.grad is None or not teacher.grad.any()
    assert student.grad[masks].abs().sum() > 0
    assert not student.grad[~masks].any()


def test_no_masked_patch_gives_zero() -> None:
    masks = torch.zeros(2, 2, 4, dtype=torch.bool)
    scores = torch.zeros(0, 5, requires_grad=True)
    loss = IBOTPatchLoss(5)(scores, torch.zeros(0, 5), masks)
    assert loss.item() == 0.0
    loss.backward()


def test_patch_centre_is_the_ema_of_position_then_image_means() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 9, 4, generator=generator, dtype=torch.float64)
    loss_fn = IBOTPatchLoss(4, center_momentum=0.8).double()
    previous = torch.randn(1, 4, generator=generator, dtype=torch.float64)
    loss_fn.center.copy_(previous)
    loss_fn.update_center(scores)
    batch_mean = [
        sum(sum(scores[n, p, k].item() for p in range(9)) / 9 for n in range(6)) / 6
        for k in range(4)
    ]
    expected = [0.8 * previous[0, k].item() + 0.2 * batch_mean[k] for k in range(4)]
    assert loss_fn.center[0].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("student_rows", "target_rows", "masks", "match"),
    [
        (3, 3, torch.ones(1, 1, 2, dtype=torch.bool), "student_scores.*masked patch"),
        (2, 3, torch.ones(1, 1, 2, dtype=torch.bool), "teacher_probs.*masked patch"),
        (2, 2, torch.ones(1, 2), "masks must be a bool"),
    ],
)
def test_bad_inputs_name_the_argument(
    student_rows: int, target_rows: int, masks: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        IBOTPatchLoss(4)(torch.zeros(student_rows, 4), torch.zeros(target_rows, 4), masks)
