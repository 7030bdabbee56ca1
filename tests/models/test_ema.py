"""EMA teacher: the update formula, its edge cases, buffers, mismatches and the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from protogmm.models import make_teacher, teacher_momentum, update_ema_


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher, student = _model(), _model()  # different random inits
    return teacher, student


def test_update_matches_the_formula() -> None:
    teacher, student = _pair()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_ema_(teacher, student, 0.9)
    for name, param in student.named_parameters():
        expected = before[name] * 0.9 + (1.0 - 0.9) * param.detach()
        # float64 and a tolerance of a few ulps: the add may be fused (FMA) on some CPUs.
        torch.testing.assert_close(teacher.get_parameter(name), expected, rtol=1e-15, atol=1e-15)


def test_momentum_one_keeps_teacher_and_zero_copies_student() -> None:
    teacher, student = _pair()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_ema_(teacher, student, 1.0)
    for name, param in teacher.named_parameters():
        assert torch.equal(param, before[name])
    update_ema_(teacher, student, 0.0)
    for (name, param), (_, source) in zip(
        teacher.named_parameters(), student.named_parameters(), strict=True
    ):
        assert torch.equal(param, source), name


def test_buffers_untouched_and_no_autograd_graph() -> None:
    teacher, student = _pair()
    student.train()
    student(torch.randn(8, 3, dtype=torch.float64))  # moves the student's BN running stats
    teacher_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    update_ema_(teacher, student, 0.5)
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, teacher_buffers[name]), name
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)
    assert all(p.grad_fn is None for p in teacher.parameters())


def test_works_on_a_teacher_made_by_make_teacher() -> None:
    torch.manual_seed(0)
    student = _model()
    teacher = make_teacher(student)
    assert teacher is not student
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (_, t), (_, s) in zip(
        teacher.state_dict().items(), student.state_dict().items(), strict=True
    ):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_ema_(teacher, student, 0.75)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s - 0.75)
        assert not t.requires_grad


def test_mismatch_names_the_parameter() -> None:
    teacher = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    wrong_shape = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"'1\.weight'"):
        update_ema_(teacher, wrong_shape, 0.9)
    extra = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        update_ema_(teacher, extra, 0.9)
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        update_ema_(extra, teacher, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_ema_(teacher, teacher, 1.5)


def test_teacher_momentum_schedule() -> None:
    assert teacher_momentum(0, 100) == pytest.approx(0.996)
    assert teacher_momentum(100, 100) == 1.0
    assert teacher_momentum(250, 100) == 1.0
    assert teacher_momentum(50, 100) == pytest.approx((0.996 + 1.0) / 2)
    # DINO's cosine: m(t) = final + (base - final) * (1 + cos(pi t / T)) / 2.
    expected = 1.0 + (0.99 - 1.0) * 0.5 * (1 + math.cos(math.pi * 25 / 100))
    assert teacher_momentum(25, 100, base=0.99) == pytest.approx(expected)
    with pytest.raises(ValueError, match="base"):
        teacher_momentum(0, 10, base=1.2)
