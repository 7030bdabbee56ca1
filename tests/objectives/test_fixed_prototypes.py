"""DINO's loss against fixed prototypes: the same value and embedding gradient as DINOLoss on
the scores, in float64, with no [N, K] tensor kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_dino_loss import _reference_loss

from protogmm.objectives import DINOLoss, fixed_prototypes
from protogmm.prototypes import OnlineGMM


def _inputs(
    num_student: int, num_teacher: int, batch: int, k: int, d: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(num_student * batch, d, generator=generator, dtype=torch.float64))
    prototypes = F.normalize(torch.randn(k, d, generator=generator, dtype=torch.float64))
    targets = torch.softmax(
        torch.randn(num_teacher, batch, k, generator=generator, dtype=torch.float64) / 0.3, -1
    )
    return z, prototypes, targets


@pytest.mark.parametrize(("num_student", "num_teacher"), [(2, 2), (4, 2), (6, 2), (3, 1)])
@pytest.mark.parametrize("block_elements", [1 << 24, 7 * 3])  # a block a view; 3 images
def test_value_and_gradient_equal_dinoloss_on_the_scores(
    num_student: int, num_teacher: int, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 3 images over views of 4: a full and a partial block in every view.
    monkeypatch.setattr(fixed_prototypes, "_BLOCK_ELEMENTS", block_elements)
    batch, k, d = 4, 7, 5
    z, prototypes, targets = _inputs(num_student, num_teacher, batch, k, d, seed=num_student)
    loss_fn = DINOLoss(k, student_temperature=0.1)

    by_scores = z.clone().requires_grad_()
    scores = (by_scores @ prototypes.T).view(num_student, batch, k)
    expected = loss_fn(scores, teacher_probs=targets)
    expected.backward()

    fused = z.clone().requires_grad_()
    loss = loss_fn.against_fixed_prototypes(fused, prototypes, targets)
    loss.backward()

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.grad, by_scores.grad, rtol=1e-10, atol=1e-12)
    reference = _reference_loss(scores.detach(), targets.tolist(), 0.1)
    assert loss.item() == pytest.approx(reference, rel=1e-10)


def test_targets_that_do_not_sum_to_one_get_the_same_gradient_too() -> None:
    z, prototypes, targets = _inputs(4, 2, 3, 6, 4, seed=1)
    targets = targets * torch.tensor([0.5, 2.0], dtype=torch.float64)[:, None, None]
    loss_fn = DINOLoss(6)
    by_scores, fused = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_fn((by_scores @ prototypes.T).view(4, 3, 6), teacher_probs=targets).backward()
    loss_fn.against_fixed_prototypes(fused, prototypes, targets).backward()
    torch.testing.assert_close(fused.grad, by_scores.grad, rtol=1e-10, atol=1e-12)


def test_backward_keeps_no_rows_by_prototypes_tensor() -> None:
    num_student, batch, k, d = 6, 8, 512, 16
    z, prototypes, targets = _inputs(num_student, 2, batch, k, d, seed=0)
    z, prototypes, targets = z.float(), prototypes.float(), targets.float()
    loss_fn = DINOLoss(k)

    def saved_shapes(compute: str) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(tensor.shape))
            return tensor

        x = z.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if compute == "scores":
                loss_fn((x @ prototypes.T).view(num_student, batch, k), teacher_probs=targets)
            else:
                loss_fn.against_fixed_prototypes(x, prototypes, targets)
        return shapes

    # What autograd keeps on the scores: the [V_s, B, K] log-probabilities among others.
    assert (num_student, batch, k) in saved_shapes("scores")
    assert saved_shapes("fused") == [(num_student * batch, d)]  # the gradient alone


def test_float32_under_bf16_autocast_matches_float32_without_it() -> None:
    z, prototypes, targets = _inputs(4, 2, 4, 16, 8, seed=2)
    z, prototypes, targets = z.float(), prototypes.float(), targets.float()
    loss_fn = DINOLoss(16)
    plain = loss_fn.against_fixed_prototypes(z, prototypes, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn.against_fixed_prototypes(z, prototypes, targets)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2 * 4, 5), r"embeddings must hold V_s >= max\(2, V_t\) views of 4 rows"),
        ((7, 5), r"embeddings must hold"),
        ((12, 3), r"embeddings must have 5 columns"),
    ],
)
def test_bad_shapes_are_one_line_errors(shape: tuple[int, int], message: str) -> None:
    _, prototypes, targets = _inputs(3, 3, 4, 7, 5, seed=0)
    with pytest.raises(ValueError, match=message):
        DINOLoss(7).against_fixed_prototypes(torch.randn(*shape), prototypes, targets)


@pytest.mark.parametrize("center_momentum", [None, 0.9])
def test_a_mixtures_unit_inputs_and_prototypes_give_its_scores_loss(
    center_momentum: float | None,
) -> None:
    gmm = OnlineGMM(8, 6, init_samples=0, center_momentum=center_momentum)
    generator = torch.Generator().manual_seed(0)
    gmm.update(torch.randn(32, 6, generator=generator))  # initialised, centre moved
    z = torch.randn(4 * 5, 6, generator=generator)  # 4 views of 5 images, not unit
    targets = torch.softmax(torch.randn(2, 5, 8, generator=generator), dim=-1)
    loss_fn = DINOLoss(8)
    by_scores, fused = z.clone().requires_grad_(), z.clone().requires_grad_()
    expected = loss_fn(gmm(by_scores).view(4, 5, 8), teacher_probs=targets)
    expected.backward()
    loss = loss_fn.against_fixed_prototypes(gmm.unit_inputs(fused), gmm.prototypes(), targets)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused.grad, by_scores.grad)
