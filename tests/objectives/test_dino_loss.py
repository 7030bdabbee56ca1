"""DINOLoss against an independent, element-by-element reference of Caron et al. (2021)."""

from __future__ import annotations

import time

import pytest
import torch
from references import log_softmax_row, softmax_row

from protogmm.objectives import DINOLoss


def _reference_loss(student: torch.Tensor, targets: list[list[list[float]]], tau_s: float) -> float:
    """Mean over pairs (t, s != t) of the batch-mean cross-entropy, per element in Python."""
    v_s, batch, _ = student.shape
    total, pairs = 0.0, 0
    for t, target_view in enumerate(targets):
        for s in range(v_s):
            if s == t:
                continue
            ce_sum = 0.0
            for b in range(batch):
                logp = log_softmax_row([x / tau_s for x in student[s, b].tolist()])
                ce_sum += -sum(q * lp for q, lp in zip(target_view[b], logp, strict=True))
            total += ce_sum / batch
            pairs += 1
    return total / pairs


def _reference_targets(
    teacher: torch.Tensor, center: list[float], tau_t: float
) -> list[list[list[float]]]:
    return [
        [
            softmax_row([(x - c) / tau_t for x, c in zip(row.tolist(), center, strict=True)])
            for row in view
        ]
        for view in teacher
    ]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("v_s", [2, 4, 6])
@pytest.mark.parametrize(("tau_s", "tau_t"), [(0.1, 0.04), (0.2, 0.07)])
def test_matches_reference(batch: int, v_s: int, tau_s: float, tau_t: float) -> None:
    torch.manual_seed(batch * 100 + v_s)
    k = 7
    student = torch.rand(v_s, batch, k, dtype=torch.float64) * 2 - 1
    teacher = torch.rand(2, batch, k, dtype=torch.float64) * 2 - 1
    loss_fn = DINOLoss(k, student_temperature=tau_s).double()
    center = torch.randn(1, k, dtype=torch.float64) * 0.1
    loss_fn.center.copy_(center)

    loss = loss_fn(student, teacher, teacher_temperature=tau_t)
    expected = _reference_loss(
        student, _reference_targets(teacher, center[0].tolist(), tau_t), tau_s
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, abs=1e-6, rel=1e-6)


def test_float32_matches_reference() -> None:
    torch.manual_seed(0)
    student = torch.rand(4, 5, 9) * 2 - 1
    teacher = torch.rand(2, 5, 9) * 2 - 1
    loss = DINOLoss(9)(student, teacher, teacher_temperature=0.04)
    expected = _reference_loss(student.double(), _reference_targets(teacher, [0.0] * 9, 0.04), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_targets_use_previous_center_then_update() -> None:
    torch.manual_seed(1)
    k, m = 6, 0.9
    loss_fn = DINOLoss(k, center_momentum=m).double()
    center = [0.0] * k
    for step in range(4):
        student = torch.rand(3, 4, k, dtype=torch.float64) * 2 - 1
        teacher = torch.rand(2, 4, k, dtype=torch.float64) * 2 - 1
        loss = loss_fn(student, teacher, teacher_temperature=0.05)
        expected = _reference_loss(student, _reference_targets(teacher, center, 0.05), 0.1)
        assert loss.item() == pytest.approx(expected, abs=1e-6), step
        rows = [row.tolist() for view in teacher for row in view]
        mean = [sum(r[j] for r in rows) / len(rows) for j in range(k)]
        center = [m * c + (1 - m) * x for c, x in zip(center, mean, strict=True)]
        assert loss_fn.center.shape == (1, k)
        torch.testing.assert_close(
            loss_fn.center[0], torch.tensor(center, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_update_center_flag_and_public_method() -> None:
    torch.manual_seed(2)
    loss_fn = DINOLoss(5)
    student, teacher = torch.randn(4, 3, 5), torch.randn(2, 3, 5)
    loss_fn(student, teacher, teacher_temperature=0.04, update_center=False)
    assert torch.equal(loss_fn.center, torch.zeros(1, 5))
    loss_fn.eval()  # training mode must not matter
    loss_fn.update_center(teacher)
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.reshape(-1, 5).mean(0, keepdim=True))


def test_teacher_distribution() -> None:
    torch.manual_seed(3)
    loss_fn = DINOLoss(4)
    loss_fn.center.fill_(0.3)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    probs = loss_fn.teacher_distribution(teacher, 0.07)
    assert probs.shape == (2, 3, 4) and probs.dtype == torch.float32
    assert not probs.requires_grad
    torch.testing.assert_close(probs, torch.softmax((teacher.detach() - 0.3) / 0.07, dim=-1))
    torch.testing.assert_close(loss_fn.center, torch.full((1, 4), 0.3))  # not updated


def test_teacher_probs_path_is_plain_cross_entropy() -> None:
    torch.manual_seed(4)
    k = 6
    loss_fn = DINOLoss(k, student_temperature=0.2).double()
    loss_fn.center.fill_(5.0)  # must be ignored
    student = torch.randn(4, 3, k, dtype=torch.float64)
    probs = torch.softmax(torch.randn(2, 3, k, dtype=torch.float64), dim=-1)
    loss = loss_fn(student, teacher_probs=probs)
    expected = _reference_loss(student, probs.tolist(), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(loss_fn.center, torch.full((1, k), 5.0, dtype=torch.float64))


def test_gradients_reach_student_only() -> None:
    torch.manual_seed(5)
    student = torch.randn(4, 3, 8, requires_grad=True)
    teacher = torch.randn(2, 3, 8, requires_grad=True)
    probs = torch.softmax(torch.randn(2, 3, 8), dim=-1).requires_grad_()
    loss_fn = DINOLoss(8)
    loss_fn(student, teacher, teacher_temperature=0.04).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    student.grad = None
    loss_fn(student, teacher_probs=probs).backward()
    assert probs.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_bfloat16_student_is_upcast() -> None:
    torch.manual_seed(6)
    student = torch.randn(3, 4, 10).bfloat16()
    teacher = torch.randn(2, 4, 10).bfloat16()
    loss = DINOLoss(10)(student, teacher, teacher_temperature=0.04)
    ref = DINOLoss(10)(student.float(), teacher.float(), teacher_temperature=0.04)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_center_in_state_dict() -> None:
    loss_fn = DINOLoss(3)
    loss_fn.update_center(torch.ones(2, 2, 3))
    other = DINOLoss(3)
    other.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(other.center, torch.full((1, 3), 0.1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"num_prototypes": 4, "student_temperature": 0.0}, "student_temperature"),
        ({"num_prototypes": 4, "center_momentum": 1.5}, "center_momentum"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DINOLoss(**kwargs)


def _call(student, teacher=None, **kwargs):
    return DINOLoss(4)(student, teacher, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.randn(3, 4),), {"teacher_probs": torch.rand(2, 3, 4)}, r"student_scores.*\(3, 4\)"),
        (
            (torch.randn(3, 2, 5), torch.randn(2, 2, 5)),
            {"teacher_temperature": 0.1},
            r"student_scores.*\(3, 2, 5\)",
        ),
        (
            (torch.randn(1, 2, 4),),
            {"teacher_probs": torch.rand(1, 2, 4)},
            r"student_scores.*\(1, 2, 4\)",
        ),
        (
            (torch.randn(3, 2, 4), torch.randn(2, 3, 4)),
            {"teacher_temperature": 0.1},
            r"teacher_scores.*\(2, 3, 4\)",
        ),
        (
            (torch.randn(3, 2, 4), torch.randn(4, 2, 4)),
            {"teacher_temperature": 0.1},
            r"teacher_scores.*\(4, 2, 4\)",
        ),
        (
            (torch.randn(3, 2, 4), torch.randn(2, 2, 3)),
            {"teacher_temperature": 0.1},
            r"teacher_scores.*\(2, 2, 3\)",
        ),
        (
            (torch.randn(3, 2, 4),),
            {"teacher_probs": torch.rand(2, 3, 4)},
            r"teacher_probs.*\(2, 3, 4\)",
        ),
        ((torch.randn(3, 2, 4),), {}, "teacher_scores.*teacher_probs"),
        (
            (torch.randn(3, 2, 4), torch.randn(2, 2, 4)),
            {"teacher_temperature": 0.1, "teacher_probs": torch.rand(2, 2, 4)},
            "teacher_scores.*teacher_probs",
        ),
        ((torch.randn(3, 2, 4), torch.randn(2, 2, 4)), {}, "teacher_temperature"),
        (
            (torch.randn(3, 2, 4), torch.randn(2, 2, 4)),
            {"teacher_temperature": 0.0},
            "teacher_temperature",
        ),
        (
            (torch.randn(3, 2, 4), torch.randn(2, 2, 4)),
            {"teacher_temperature": -0.1},
            "teacher_temperature",
        ),
        (
            (torch.randn(3, 2, 4),),
            {"teacher_probs": torch.rand(2, 2, 4), "teacher_temperature": 0.1},
            "teacher_temperature",
        ),
        (
            (torch.randint(0, 2, (3, 2, 4)),),
            {"teacher_probs": torch.rand(2, 2, 4)},
            "student_scores.*dtype",
        ),
    ],
)
def test_bad_inputs_name_the_argument(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _call(*args, **kwargs)


def _center_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        teacher = torch.full((2, 3, 4), float(rank + 1))  # rank 0: ones, rank 1: twos
        loss_fn = DINOLoss(4, center_momentum=0.5)
        loss_fn.update_center(teacher)
        if rank == 0:
            torch.save(loss_fn.center, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.xdist_group("multiprocess")  # one launch at a time (tests/training/test_ddp.py)
def test_center_update_is_all_reduced(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "center.pt"
    # fork, not spawn: children inherit the imported torch, so this takes ~1 s, not ~15 s.
    context = mp.start_processes(
        _center_worker,
        args=(2, str(tmp_path / "init"), str(out)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    # Bounded wait: a wedged rendezvous must fail the test, not hang the suite.
    deadline = time.monotonic() + 60.0
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("2-rank gloo workers did not finish within 60 s")
    # Global mean over both ranks is 1.5; center = 0.5 * 0 + 0.5 * 1.5.
    torch.testing.assert_close(torch.load(out), torch.full((1, 4), 0.75))


def test_reset_center_sets_moved_prototypes_to_the_mean_of_the_others() -> None:
    loss = DINOLoss(num_prototypes=5)
    loss.center.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]]))
    moved = torch.tensor([False, True, False, False, True])
    loss.reset_center(moved)
    expected = torch.tensor([[0.1, (0.1 + 0.3 + 0.4) / 3, 0.3, 0.4, (0.1 + 0.3 + 0.4) / 3]])
    torch.testing.assert_close(loss.center, expected)
    # nothing moved, or everything moved (no reference left): unchanged
    before = loss.center.clone()
    loss.reset_center(torch.zeros(5, dtype=torch.bool))
    loss.reset_center(torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(loss.center, before)
