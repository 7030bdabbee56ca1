"""The optimizer and its parameter groups (DINO's layout), for every host and kind."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from protogmm.prototypes.sets import PrototypeSets

#: Momentum of the SGD-based optimizers (DINO's and CARP's LARS, DINO's SGD).
OPTIMIZER_MOMENTUM = 0.9


def parameter_groups(
    student: nn.Module, prototypes: PrototypeSets, lr_multiplier: float, lr: float
) -> tuple[list[dict[str, Any]], list[tuple[float, bool]]]:
    """DINO's two groups (weights decayed; biases and norms not), and a third for jointly
    learned prototypes when ``lr_multiplier != 1``.

    At 1 the layout stays DINO's two groups, so checkpoints of either layout keep loading
    into the runs that made them. Partial's clustering layer is trained by its own loss only
    (CAPI uses a separate AdamW; one optimizer is the same update, since no other loss
    reaches it), without decay.

    Returns:
        The groups, and per group (by position) its factor on the scheduled learning rate and
        whether it follows the weight-decay schedule.
    """
    learned = [p for prototype_set in prototypes.learned for p in prototype_set.parameters()]
    separate = {id(param) for param in learned} if lr_multiplier != 1.0 else set()
    decayed, not_decayed, prototype_params = [], [], []
    for name, param in student.named_parameters():
        if id(param) in separate:
            prototype_params.append(param)
        elif param.ndim <= 1 or name.endswith(".bias"):
            not_decayed.append(param)
        else:
            decayed.append(param)
    if prototypes.clustering is not None:
        not_decayed += list(prototypes.clustering.parameters())
    groups: list[dict[str, Any]] = [
        {"params": decayed},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    schedule = [(1.0, True), (1.0, False)]
    if prototype_params:
        groups.append({"params": prototype_params, "lr": lr * lr_multiplier})
        schedule.append((lr_multiplier, True))
    return groups, schedule


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``name``'s optimizer over ``groups`` (their learning rate and decay are set per step).

    ``"lars"`` is timm's LARS with DINO's settings (momentum 0.9, trust coefficient 0.001):
    the layer-wise trust ratio applies to groups with weight decay only, so biases and norms
    are not adapted, as DINO's ``lars_adaptation_filter``.
    """
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=OPTIMIZER_MOMENTUM, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=OPTIMIZER_MOMENTUM, weight_decay=weight_decay
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def clip_each_parameter_(parameters: Iterable[Tensor], max_norm: float) -> None:
    """DINO's ``--clip_grad`` (its ``utils.clip_gradients``): each parameter's gradient is
    scaled to L2 norm at most ``max_norm`` on its own, ``g * min(1, c / (||g|| + 1e-6))``.

    Lightning's ``gradient_clip_val`` instead scales every gradient by one factor, from the
    norm of all of them together. Parameters without a gradient are left alone.
    """
    for param in parameters:
        if param.grad is not None:
            norm = torch.linalg.vector_norm(param.grad)
            param.grad.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))
