"""koleo_proto_loss against the naive full-distance-matrix formula."""

from __future__ import annotations

import pytest
import torch

from protogmm.prototypes.koleo import koleo_proto_loss


def _naive(prototypes: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    c = prototypes / prototypes.norm(dim=1, keepdim=True)
    d = torch.cdist(c, c)
    self_pair = torch.eye(len(c), dtype=torch.bool)
    d = d.masked_fill(self_pair, float("inf"))  # out of place: keeps cdist's grad intact
    return -torch.log(d.min(dim=1).values + eps).mean()


@pytest.mark.parametrize("k", [2, 3, 17])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 2048])
def test_matches_naive_formula(k: int, chunk_size: int) -> None:
    torch.manual_seed(k * 31 + chunk_size)
    protos = torch.randn(k, 5, dtype=torch.float64) * 3
    loss = koleo_proto_loss(protos, chunk_size=chunk_size)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert loss.item() == pytest.approx(_naive(protos).item(), abs=1e-6)


def test_gradient_matches_naive_formula() -> None:
    torch.manual_seed(0)
    protos = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    (g_chunked,) = torch.autograd.grad(koleo_proto_loss(protos, chunk_size=5), protos)
    (g_naive,) = torch.autograd.grad(_naive(protos), protos)
    torch.testing.assert_close(g_chunked, g_naive, atol=1e-9, rtol=1e-7)


def test_gradient_step_pushes_nearest_pair_apart() -> None:
    torch.manual_seed(1)
    protos = torch.randn(10, 6, dtype=torch.float64)
    protos[1] = protos[0] + 0.05 * torch.randn(6, dtype=torch.float64)  # a clear nearest pair
    protos.requires_grad_()

    def nearest(p: torch.Tensor) -> float:
        c = p / p.norm(dim=1, keepdim=True)
        d = torch.cdist(c, c)
        d.fill_diagonal_(float("inf"))
        return d.min().item()

    (grad,) = torch.autograd.grad(koleo_proto_loss(protos), protos)
    before = nearest(protos.detach())
    after = nearest(protos.detach() - 1e-3 * grad)
    assert after > before


def test_duplicates_are_finite() -> None:
    protos = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_proto_loss(protos)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_naive(protos.detach()).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(protos.grad).all()


def test_float32_and_half_inputs() -> None:
    torch.manual_seed(2)
    protos = torch.randn(9, 3)
    torch.testing.assert_close(koleo_proto_loss(protos), _naive(protos))
    assert koleo_proto_loss(protos.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(
    ("protos", "match"),
    [
        (torch.randn(1, 4), r"prototypes.*\(1, 4\)"),
        (torch.randn(4), r"prototypes.*\(4,\)"),
        (torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), "prototypes.*non-finite"),
    ],
)
def test_bad_prototypes_raise(protos: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        koleo_proto_loss(protos)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        koleo_proto_loss(torch.randn(3, 2), chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        koleo_proto_loss(torch.randn(3, 2), eps=-1.0)
