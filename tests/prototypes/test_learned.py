"""LearnedPrototypes: DINO's weight-normalised last layer with unit rows."""

from __future__ import annotations

import pytest
import torch

from protogmm.prototypes.base import PrototypeSet
from protogmm.prototypes.learned import LearnedPrototypes


def test_interface() -> None:
    torch.manual_seed(0)
    protos = LearnedPrototypes(5, 3)
    assert isinstance(protos, PrototypeSet)
    assert (protos.num_prototypes, protos.dim) == (5, 3)
    assert protos.decoupled is False
    assert protos.weight.shape == (5, 3) and protos.weight.requires_grad
    assert protos.update(torch.randn(4, 3)) is None


def test_init_is_seeded_by_global_rng() -> None:
    torch.manual_seed(7)
    a = LearnedPrototypes(6, 4)
    torch.manual_seed(7)
    b = LearnedPrototypes(6, 4)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_prototypes_are_unit_norm_whatever_the_weight_scale(scale: float) -> None:
    torch.manual_seed(1)
    protos = LearnedPrototypes(8, 5)
    with torch.no_grad():
        protos.weight.mul_(scale)
    c = protos.prototypes()
    assert c.shape == (8, 5)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(8))


def test_forward_is_cosine() -> None:
    torch.manual_seed(2)
    protos = LearnedPrototypes(6, 4).double()
    z = torch.randn(5, 4, dtype=torch.float64) * 3
    scores = protos(z)
    assert scores.shape == (5, 6)
    w = protos.weight.detach()
    for b in range(5):
        for k in range(6):
            expected = torch.dot(z[b], w[k]) / (z[b].norm() * w[k].norm())
            assert scores[b, k].item() == pytest.approx(expected.item(), abs=1e-12)


def test_gradients_reach_weight_and_z() -> None:
    torch.manual_seed(3)
    protos = LearnedPrototypes(6, 4)
    z = torch.randn(5, 4, requires_grad=True)
    (protos(z) * torch.randn(5, 6)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert protos.weight.grad is not None and protos.weight.grad.abs().sum() > 0


def test_state_dict_round_trip() -> None:
    torch.manual_seed(4)
    a = LearnedPrototypes(6, 4)
    b = LearnedPrototypes(6, 4)
    assert set(a.state_dict()) == {"weight"}
    b.load_state_dict(a.state_dict())
    z = torch.randn(3, 4)
    assert torch.equal(a(z), b(z))


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.randn(3, 5), r"z.*\(3, 5\)"),
        (torch.randn(4), r"z.*\(4,\)"),
        (torch.randn(2, 3, 4), r"z.*\(2, 3, 4\)"),
        (torch.ones(3, 4, dtype=torch.long), "z.*dtype"),
    ],
)
def test_bad_z_raises(z: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnedPrototypes(6, 4)(z)


@pytest.mark.parametrize(
    ("args", "name"), [((0, 4), "num_prototypes"), ((4, 0), "dim"), ((2.0, 4), "num_prototypes")]
)
def test_bad_sizes_raise(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LearnedPrototypes(*args)


@pytest.mark.parametrize("init_scale", [0.25, 0.1, 3.0])
def test_init_scale_scales_the_rows_and_keeps_their_directions(init_scale: float) -> None:
    torch.manual_seed(5)
    reference = LearnedPrototypes(16, 8)
    next_draw = torch.rand(3)
    torch.manual_seed(5)
    scaled = LearnedPrototypes(16, 8, init_scale=init_scale)
    assert torch.equal(torch.rand(3), next_draw)  # the same draws as at 1, no extra ones
    norms, reference_norms = scaled.weight.norm(dim=1), reference.weight.norm(dim=1)
    torch.testing.assert_close(norms, init_scale * reference_norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled.prototypes(), reference.prototypes(), rtol=0, atol=1e-7)
    if init_scale == 0.25:  # a power of two: the scaling is exact in floating point
        assert torch.equal(scaled.weight, 0.25 * reference.weight)
        assert torch.equal(norms, 0.25 * reference_norms)
        assert torch.equal(scaled.prototypes(), reference.prototypes())


@pytest.mark.parametrize("init_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_init_scale_raises(init_scale: float) -> None:
    with pytest.raises(ValueError, match="init_scale"):
        LearnedPrototypes(4, 3, init_scale=init_scale)
