"""ProjectionHead: DINO's MLP to an L2-normalised bottleneck (without the prototype layer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protogmm.models import ProjectionHead


def _linears(head: ProjectionHead) -> list[nn.Linear]:
    return [m for m in head.mlp if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("use_bn", [False, True])
def test_output_is_unit_norm(use_bn: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(20, hidden_dim=16, bottleneck_dim=8, use_bn=use_bn)
    z = head(torch.randn(5, 20) * 100)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5])
def test_layer_count_and_dims(num_layers: int) -> None:
    head = ProjectionHead(20, hidden_dim=16, bottleneck_dim=8, num_layers=num_layers)
    linears = _linears(head)
    assert len(linears) == num_layers
    assert linears[0].in_features == 20 and linears[-1].out_features == 8
    dims = [(lin.in_features, lin.out_features) for lin in linears]
    expected = (
        [(20, 8)] if num_layers == 1 else ([(20, 16)] + [(16, 16)] * (num_layers - 2) + [(16, 8)])
    )
    assert dims == expected
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == num_layers - 1
    assert (head.in_dim, head.out_dim) == (20, 8)


def test_batchnorm_option() -> None:
    without = ProjectionHead(20, hidden_dim=16, bottleneck_dim=8, num_layers=3)
    with_bn = ProjectionHead(20, hidden_dim=16, bottleneck_dim=8, num_layers=3, use_bn=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in without.mlp)
    norms = [m for m in with_bn.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and all(bn.num_features == 16 for bn in norms)
    # BN sits between each hidden Linear and its GELU; none after the bottleneck Linear.
    kinds = [type(m) for m in with_bn.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 2 + [nn.Linear]


def test_dino_init() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(256, hidden_dim=512, bottleneck_dim=128)
    for lin in _linears(head):
        assert torch.count_nonzero(lin.bias) == 0
        # DINO's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. in effect a normal.
        assert lin.weight.abs().max() < 0.15
        assert abs(float(lin.weight.detach().std()) - 0.02) < 0.002


def test_gradients_flow_and_bad_input() -> None:
    head = ProjectionHead(6, hidden_dim=4, bottleneck_dim=3)
    x = torch.randn(4, 6, requires_grad=True)
    head(x)[:, 0].sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="x must have shape"):
        head(torch.randn(4, 5))
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(6, num_layers=0)
