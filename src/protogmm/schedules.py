"""Per-step schedules (pure functions): one place for every cosine ramp in the project.

Used by the trainer (learning rate, weight decay, teacher momentum, teacher temperature)
and by :class:`protogmm.prototypes.OnlineGMM` (deterministic-annealing β).
"""

from __future__ import annotations

import math


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (at step 0) to ``end`` (at ``total_steps``).

    ``value(t) = end + (start - end) * (1 + cos(pi * t / T)) / 2`` for ``0 <= t < T`` and
    ``end`` afterwards, as in DINO's ``cosine_scheduler``. ``total_steps <= 0`` means
    "already at the end".
    """
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    step = max(step, 0)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))


def linear_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear interpolation from ``start`` (step 0) to ``end`` (``total_steps`` and after)."""
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    step = max(step, 0)
    return float(start + (end - start) * step / total_steps)


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float, initial: float = 0.0
) -> float:
    """Linear warm-up from ``initial`` to ``peak`` over ``warmup_steps``, then cosine to ``final``.

    This is the learning-rate shape of DINO (``utils.cosine_scheduler`` with warm-up).
    """
    if step < warmup_steps:
        return linear_ramp(step, warmup_steps, initial, peak)
    return cosine_ramp(step - warmup_steps, total_steps - warmup_steps, peak, final)
