"""Backbones: output shapes at several input sizes, ViT masking and positional interpolation,
the registry's errors and the optional timm adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protogmm.models import (
    BACKBONES,
    ConvNet,
    SmallViT,
    TorchvisionResNet,
    build_backbone,
)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ ConvNet
@pytest.mark.parametrize("downsample", ["pool", "stride"])
@pytest.mark.parametrize("size", [8, 12, 28, 32])
def test_convnet_shapes(size: int, downsample: str) -> None:
    torch.manual_seed(0)
    net = ConvNet(downsample=downsample)
    out = net(torch.randn(3, 1, size, size))
    assert out.shape == (3, net.feature_dim) == (3, 256)
    assert torch.isfinite(out).all()


def test_convnet_param_count_near_half_a_million() -> None:
    assert 300_000 <= _num_params(ConvNet()) <= 800_000


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_convnet_norms_and_rgb(norm: str) -> None:
    net = ConvNet(in_channels=3, width=8, norm=norm)
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, 32)


def test_convnet_backward_reaches_every_parameter() -> None:
    net = ConvNet(width=8)
    net(torch.randn(4, 1, 12, 12)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_convnet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="layer")
    with pytest.raises(ValueError, match="width"):
        ConvNet(width=0)
    with pytest.raises(ValueError, match="x must have shape"):
        ConvNet()(torch.randn(2, 3, 28, 28))


# ------------------------------------------------------------------------------ SmallViT
def _tiny_vit(**kwargs: object) -> SmallViT:
    torch.manual_seed(0)
    options: dict = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    options.update(kwargs)
    return SmallViT(**options).eval()


def test_vit_defaults() -> None:
    vit = SmallViT()
    assert vit.feature_dim == 192
    assert vit.pos_embed.shape == (1, 1 + 49, 192)
    assert vit.mask_token.shape == vit.cls_token.shape == (1, 1, 192)
    assert vit.num_patches(28) == 49 and vit.num_patches(12) == 9 and vit.num_patches(13) == 9
    # DINO init: trunc_normal_(std=0.02) (truncated at +-2 absolute, in effect a normal).
    assert abs(float(vit.pos_embed.detach().std()) - 0.02) < 0.003
    qkv = vit.blocks[0].self_attn
    assert abs(float(qkv.in_proj_weight.detach().std()) - 0.02) < 0.003
    assert torch.count_nonzero(qkv.in_proj_bias) == 0
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 192)


@pytest.mark.parametrize(("size", "patches"), [(28, 49), (12, 9), (14, 9), (32, 64)])
def test_vit_forward_tokens_shapes(size: int, patches: int) -> None:
    vit = _tiny_vit()
    cls, tokens = vit.forward_tokens(torch.randn(3, 1, size, size))
    assert cls.shape == (3, 32)
    assert tokens.shape == (3, patches, 32)
    torch.testing.assert_close(vit(x := torch.randn(1, 1, size, size)), vit.forward_tokens(x)[0])


def test_vit_positional_embedding_is_interpolated_for_other_sizes() -> None:
    vit = _tiny_vit()
    same = vit._pos_embed(7, 7)
    assert same is vit.pos_embed
    small = vit._pos_embed(3, 3)
    assert small.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(small[:, 0], vit.pos_embed[:, 0])  # [CLS] position kept
    # A constant field interpolates to the same constant (bicubic weights sum to one).
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit._pos_embed(3, 5)[:, 1:], torch.full((1, 15, 32), 0.5))


def _capture_block_input(vit: SmallViT) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen, handle


@pytest.mark.parametrize("mask_layout", ["flat", "grid"])
def test_vit_mask_replaces_exactly_the_masked_patch_embeddings(mask_layout: str) -> None:
    vit = _tiny_vit()
    x = torch.randn(2, 1, 12, 12)  # a 3x3 patch grid
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [0, 4]] = True
    mask[1, 8] = True
    seen, handle = _capture_block_input(vit)
    with torch.no_grad():
        vit.forward_tokens(x)
        vit.forward_tokens(x, mask if mask_layout == "flat" else mask.reshape(2, 3, 3))
    handle.remove()
    plain, masked = seen
    pos = vit._pos_embed(3, 3)[0, 1:]  # [9, D]
    patch_plain, patch_masked = plain[:, 1:], masked[:, 1:]
    torch.testing.assert_close(
        patch_masked[mask], (vit.mask_token[0, 0] + pos)[mask.nonzero()[:, 1]]
    )
    assert torch.equal(patch_masked[~mask], patch_plain[~mask])
    assert torch.equal(masked[:, 0], plain[:, 0])  # [CLS] untouched


def test_vit_empty_mask_changes_nothing_and_a_mask_changes_the_output() -> None:
    vit = _tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        cls, tokens = vit.forward_tokens(x)
        cls0, tokens0 = vit.forward_tokens(x, torch.zeros(2, 49, dtype=torch.bool))
        mask = torch.zeros(2, 49, dtype=torch.bool)
        mask[1, :10] = True
        cls1, _ = vit.forward_tokens(x, mask)
    assert torch.equal(cls, cls0) and torch.equal(tokens, tokens0)
    assert torch.equal(cls1[0], cls[0])  # sample 0 has no masked patch
    assert not torch.allclose(cls1[1], cls[1])


def test_vit_mask_token_gets_gradient_only_when_used() -> None:
    vit = _tiny_vit().train()
    x = torch.randn(2, 1, 12, 12)
    vit.forward_tokens(x)[1].sum().backward()
    assert vit.mask_token.grad is None or torch.count_nonzero(vit.mask_token.grad) == 0
    mask = torch.ones(2, 9, dtype=torch.bool)
    vit.forward_tokens(x, mask)[1].sum().backward()
    assert torch.count_nonzero(vit.mask_token.grad) > 0


def test_vit_rejects_bad_mask_and_arguments() -> None:
    vit = _tiny_vit()
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match="mask must have shape"):
        vit.forward_tokens(x, torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        vit.forward_tokens(x, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="at least 4 px"):
        vit(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="num_heads"):
        SmallViT(embed_dim=32, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        SmallViT(image_size=8, patch_size=16)


# -------------------------------------------------------------------------- ResNet adapter
@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28), (1, 12)])
def test_resnet18_shapes(in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = TorchvisionResNet("resnet18", in_channels=in_channels).eval()
    assert net.feature_dim == 512
    assert net(torch.randn(2, in_channels, size, size)).shape == (2, 512)


def test_resnet_small_image_stem() -> None:
    small = TorchvisionResNet("resnet18", small_images=True)
    assert small.model.conv1.kernel_size == (3, 3) and small.model.conv1.stride == (1, 1)
    assert isinstance(small.model.maxpool, nn.Identity)
    assert isinstance(small.model.fc, nn.Identity)
    large = TorchvisionResNet("resnet18", in_channels=1, small_images=False)
    assert large.model.conv1.kernel_size == (7, 7) and large.model.conv1.in_channels == 1
    assert isinstance(large.model.maxpool, nn.MaxPool2d)
    assert large.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 512)


def test_resnet50_feature_dim() -> None:
    net = TorchvisionResNet("resnet50", in_channels=3).eval()
    assert net.feature_dim == 2048
    with torch.no_grad():
        assert net(torch.randn(1, 3, 12, 12)).shape == (1, 2048)


# ----------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("name", "dim"), [("convnet", 256), ("vit", 192), ("resnet18", 512), ("resnet34", 512)]
)
def test_build_backbone_shapes(name: str, dim: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, in_channels=1, image_size=28).eval()
    assert net.feature_dim == dim
    with torch.no_grad():
        for size in (28, 12):
            assert net(torch.randn(2, 1, size, size)).shape == (2, dim)


def test_build_backbone_presets_and_overrides() -> None:
    vit = build_backbone("vit", in_channels=3, image_size=32, depth=1)
    assert isinstance(vit, SmallViT) and len(vit.blocks) == 1
    assert vit.grid_size == 8 and vit.in_channels == 3
    big = build_backbone("vit", in_channels=3, image_size=224, depth=1, embed_dim=48)
    assert big.patch_size == 16 and big.grid_size == 14
    assert BACKBONES["vit_s"][1] == {"embed_dim": 384, "depth": 12, "num_heads": 6}
    conv = build_backbone("convnet", in_channels=3, image_size=32, width=16)
    assert conv.feature_dim == 64
    assert isinstance(
        build_backbone("resnet18", in_channels=3, image_size=224).model.maxpool, nn.MaxPool2d
    )


def test_build_backbone_unknown_name_names_backbone() -> None:
    with pytest.raises(ValueError, match="backbone") as info:
        build_backbone("alexnet", in_channels=1, image_size=28)
    assert "convnet" in str(info.value) and "alexnet" in str(info.value)
    with pytest.raises(ValueError, match="depth"):
        build_backbone("convnet", in_channels=1, image_size=28, depth=3)
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("timm:", in_channels=1, image_size=28)


def test_timm_backbone_when_installed() -> None:
    net = build_backbone("timm:resnet18", in_channels=1, image_size=32).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32)).shape == (1, net.feature_dim)
