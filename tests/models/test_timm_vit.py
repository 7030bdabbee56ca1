"""timm Vision Transformers as backbones of every host: tokens, iBOT's mask token, and
local crops of another size without flags."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from protogmm.models import build_backbone
from protogmm.prototypes import Decoupled, Joint
from protogmm.training.datamodule import SSLDataModule
from protogmm.training.module import PrototypicalSSL
from protogmm.training.runner import build_trainer

#: A ViT-Ti-shaped timm model small enough for a test (32 px, 16 px patches: a 2 x 2 grid).
TINY_VIT = {"embed_dim": 24, "depth": 1, "num_heads": 2}


def tiny_vit() -> torch.nn.Module:
    return build_backbone(
        "timm:vit_tiny_patch16_224", in_channels=1, image_size=32, **TINY_VIT
    ).eval()


def test_the_cls_token_is_the_pooled_feature_and_patches_follow() -> None:
    net = tiny_vit()
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, patches = net.forward_tokens(images)
        torch.testing.assert_close(cls, net(images))
    assert (net.patch_tokens, net.grid_size, net.patch_size) == (True, 2, 16)
    assert patches.shape == (3, 4, 24)


def test_masked_patches_are_replaced_by_the_mask_token() -> None:
    net = tiny_vit()
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 1, 32, 32, generator=generator)
    everything = torch.ones(1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        # Every patch masked: the image no longer matters, only the positions.
        torch.testing.assert_close(
            net.forward_tokens(a, everything)[1], net.forward_tokens(b, everything)[1]
        )
        unmasked = net.forward_tokens(a)[1]
        one = torch.zeros(1, 4, dtype=torch.bool)
        one[0, 0] = True
        assert not torch.allclose(net.forward_tokens(a, one)[1], unmasked)
    with pytest.raises(ValueError, match="mask must hold 4 patches"):
        net.forward_tokens(a, torch.zeros(1, 3, dtype=torch.bool))


def test_vit_small_takes_96_px_local_crops_beside_224_px_views() -> None:
    net = build_backbone("timm:vit_small_patch16_224", in_channels=3, image_size=224).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 384)
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 384)
        cls, patches = net.forward_tokens(torch.randn(1, 3, 224, 224))
    assert patches.shape == (1, 196, 384) and net.grid_size == 14


def test_a_non_vit_has_no_tokens_and_ibot_refuses_it() -> None:
    net = build_backbone("timm:resnet18", in_channels=1, image_size=32)
    assert not net.patch_tokens
    with pytest.raises(ValueError, match="needs a backbone with patch tokens"):
        PrototypicalSSL(host="ibot", backbone="timm:resnet18", image_size=32)


def test_the_mask_token_is_not_in_the_timm_models_state() -> None:
    net = tiny_vit()
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        in_chans=1,
        img_size=32,
        dynamic_img_size=True,
        **TINY_VIT,
    )
    model.load_state_dict(net.model.state_dict(), strict=True)
    assert "mask_token" in dict(net.named_parameters())


@pytest.mark.parametrize("prototypes", ["joint", "decoupled"])
def test_ibot_trains_on_a_timm_vit_with_local_crops(tmp_path: Path, prototypes: str) -> None:
    L.seed_everything(0, verbose=False)
    data = SSLDataModule(
        dataset="synthetic",
        batch_size=8,
        num_local_crops=2,
        synthetic={"samples": 32, "image_size": 32},
    )
    model = PrototypicalSSL(
        host="ibot",
        backbone="timm:vit_tiny_patch16_224",
        backbone_kwargs=TINY_VIT,
        prototypes=Decoupled(gmm={"init_samples": 0}) if prototypes == "decoupled" else Joint(),
        in_channels=1,
        image_size=32,
        num_prototypes=16,
        hidden_dim=16,
        bottleneck_dim=8,
    )
    trainer = build_trainer(
        tmp_path / "run",
        max_steps=2,
        max_epochs=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = model.student["backbone"].mask_token.detach().clone()
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert not torch.equal(model.student["backbone"].mask_token, before)  # it learns
