"""The optimizers over DINO's groups: LARS adapts the decayed weights only (DINO's filter)."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_MODEL, one_step
from protogmm.prototypes import Joint
from protogmm.training.module import PrototypicalSSL
from protogmm.training.optimization import OPTIMIZER_MOMENTUM, build_optimizer


def first_step(name: str, lr: float = 0.5, weight_decay: float = 1e-2) -> tuple:
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grad_w, grad_b = torch.randn_like(weight), torch.randn_like(bias)
    params = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}]
    optimizer = build_optimizer(name, groups, lr, weight_decay)
    params[0].grad, params[1].grad = grad_w.clone(), grad_b.clone()
    optimizer.step()
    return weight, bias, grad_w, grad_b, params


def test_lars_scales_the_decayed_group_by_the_trust_ratio_and_leaves_biases_plain() -> None:
    lr, weight_decay = 0.5, 1e-2
    weight, bias, grad_w, grad_b, (new_w, new_b) = first_step("lars", lr, weight_decay)
    # You et al. 2017 with DINO's settings: trust 0.001 * ||w|| / (||g|| + wd ||w||).
    trust = 0.001 * weight.norm() / (grad_w.norm() + weight_decay * weight.norm() + 1e-8)
    expected_w = weight - lr * trust * (grad_w + weight_decay * weight)
    torch.testing.assert_close(new_w.detach(), expected_w)
    torch.testing.assert_close(new_b.detach(), bias - lr * grad_b)  # no decay, no adaptation


def test_sgd_and_adamw_are_the_plain_torch_updates() -> None:
    weight, bias, grad_w, grad_b, (new_w, new_b) = first_step("sgd")
    torch.testing.assert_close(new_w.detach(), weight - 0.5 * (grad_w + 1e-2 * weight))
    torch.testing.assert_close(new_b.detach(), bias - 0.5 * grad_b)
    optimizer = build_optimizer("sgd", [{"params": [torch.zeros(1, requires_grad=True)]}], 1, 0)
    assert optimizer.param_groups[0]["momentum"] == OPTIMIZER_MOMENTUM
    assert type(build_optimizer("adamw", [{"params": [new_w]}], 1.0, 0.0)).__name__ == "AdamW"


@pytest.mark.parametrize("name", ["lars", "sgd"])
def test_every_optimizer_keeps_the_groups_and_follows_the_schedules(name: str) -> None:
    model = PrototypicalSSL(
        **TINY_MODEL, prototypes=Joint(lr_multiplier=2.0), optimizer=name, lr=0.1
    )
    optimizer = model.configure_optimizers()
    assert len(optimizer.param_groups) == 3 and model.group_schedule[2] == (2.0, True)
    one_step(model, step=3)  # a finite step through the whole module
    with pytest.raises(ValueError, match=r"^model\.optimizer"):
        PrototypicalSSL(**TINY_MODEL, optimizer="adam")
