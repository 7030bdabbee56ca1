"""The EMA teacher of self-distillation (DINO: Caron et al., ICCV 2021; iBOT: Zhou et al. 2022).

The teacher is a copy of the student that receives no gradient; after every optimiser step
its parameters move toward the student's, ``θ_t ← m θ_t + (1 − m) θ_s``, with the momentum
``m`` following a cosine schedule from ``base`` (0.996) to 1 (DINO's ``momentum_schedule``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from protogmm._checks import check_in_range
from protogmm.schedules import cosine_ramp

__all__ = ["make_teacher", "teacher_momentum", "update_ema_"]


def make_teacher(student: nn.Module) -> nn.Module:
    """Return a deep copy of ``student`` with ``requires_grad=False`` on every parameter.

    The copy starts equal to the student, as in DINO (``teacher.load_state_dict(student
    .state_dict())``), and carries its own buffers (e.g. BatchNorm running statistics).
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``teacher_param = momentum * teacher_param + (1 - momentum) * student_param``.

    Parameters are matched by name. Buffers (BatchNorm running statistics) are left alone:
    DINO's teacher keeps its own, computed from the views it sees.

    Args:
        teacher: the EMA module, updated in place.
        student: the module trained by gradient; read only.
        momentum: ``m`` in ``[0, 1]``; 1 leaves the teacher unchanged, 0 copies the student.

    Raises:
        ValueError: if ``momentum`` is outside ``[0, 1]`` or the two modules' parameter names
            or shapes differ (naming the first mismatched parameter).
    """
    momentum = check_in_range("momentum", momentum, 0.0, 1.0)
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    for name, param in student_params.items():
        if name not in teacher_params:
            raise ValueError(f"teacher has no parameter {name!r} that the student has")
        if teacher_params[name].shape != param.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(teacher_params[name].shape)} in the "
                f"teacher and {tuple(param.shape)} in the student"
            )
    for name in teacher_params:
        if name not in student_params:
            raise ValueError(f"student has no parameter {name!r} that the teacher has")
    names = list(student_params)
    targets = [teacher_params[name] for name in names]
    sources = [student_params[name].detach() for name in names]
    if not targets:
        return
    # Same arithmetic as DINO (param_k.mul_(m).add_((1 - m) * param_q)), batched in one
    # foreach call per op instead of two kernel launches per parameter.
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """DINO's teacher momentum schedule: cosine from ``base`` (step 0) to ``final`` (the end).

    Args:
        step: the current optimiser step (0-based).
        total_steps: steps of the whole run; at and after it the value is ``final``.
        base: momentum at step 0 (DINO: 0.996).
        final: momentum at the end (DINO: 1.0).
    """
    check_in_range("base", base, 0.0, 1.0)
    check_in_range("final", final, 0.0, 1.0)
    return cosine_ramp(step, total_steps, base, final)
