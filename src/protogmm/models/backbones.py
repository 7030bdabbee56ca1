"""Encoders (backbones) for small and large images, and a registry to build them by name.

Every backbone maps images ``[B, C, H, W]`` to a feature vector ``[B, feature_dim]`` and has
an integer attribute ``feature_dim``; the projection head (:mod:`protogmm.models.heads`) is
built on top of it. Multi-crop training feeds the same encoder global views (e.g. 28 px) and
smaller local views (e.g. 12 px), so every backbone here accepts several input sizes.

This module holds the CNNs (:class:`ConvNet`, :class:`TorchvisionResNet`) and the registry
(:data:`BACKBONES`, :func:`build_backbone`); the small ViT lives in
:mod:`protogmm.models.vit` and the timm adapter in :mod:`protogmm.models.timm_backbone`,
both importable from here as before.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import Tensor, nn

from protogmm._checks import check_choice, check_positive_int
from protogmm.models._images import check_images as _check_images
from protogmm.models.timm_backbone import TimmBackbone
from protogmm.models.vit import SmallViT

__all__ = [
    "BACKBONES",
    "ConvNet",
    "SmallViT",
    "TimmBackbone",
    "TorchvisionResNet",
    "build_backbone",
]


# --------------------------------------------------------------------------------- ConvNet
class ConvNet(nn.Module):
    """A small four-stage CNN for 8-32 px images (about 0.5M parameters at ``width=64``).

    Stage ``i`` is one 3x3 conv-norm-ReLU block with ``(w, 2w, 2w, 4w)`` output channels;
    stages 2-4 first halve the resolution, then global average pooling gives the feature
    vector. At 28 px the stages see 28, 14, 7 and 4 px; at 12 px (a multi-crop local view)
    12, 6, 3 and 2 px. Halving rounds up (``ceil_mode``), so every input of at least 1 px
    works and no border pixel is dropped.

    Args:
        in_channels: image channels (1 for grayscale, 3 for RGB).
        width: channels of the first stage ``w``; ``feature_dim = 4 * width``.
        norm: ``"batch"`` (BatchNorm, default), ``"group"`` (GroupNorm, batch-size
            independent) or ``"none"`` (conv with bias).
        downsample: ``"pool"`` (2x2 max-pool before the conv, default) or ``"stride"``
            (stride-2 conv); both cost the same.

    Attributes:
        feature_dim: the output dimension, ``4 * width``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        norm: str = "batch",
        downsample: str = "pool",
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        check_choice("norm", norm, ("batch", "group", "none"))
        check_choice("downsample", downsample, ("pool", "stride"))
        self.in_channels = in_channels
        widths = (width, 2 * width, 2 * width, 4 * width)
        stages: list[nn.Module] = []
        channels = in_channels
        for index, out_channels in enumerate(widths):
            layers: list[nn.Module] = []
            stride = 1
            if index > 0 and downsample == "pool":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            elif index > 0:
                stride = 2
            layers += [
                # A conv followed by a normalisation needs no bias (the norm's shift has it).
                nn.Conv2d(channels, out_channels, 3, stride, 1, bias=norm == "none"),
                self._norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
            stages.append(nn.Sequential(*layers))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = channels
        self._init_weights()

    @staticmethod
    def _norm(norm: str, channels: int) -> nn.Module:
        if norm == "batch":
            return nn.BatchNorm2d(channels)
        if norm == "group":
            return nn.GroupNorm(math.gcd(32, channels), channels)
        return nn.Identity()

    def _init_weights(self) -> None:
        # He init for ReLU nets, as torchvision's ResNet does.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[B, C, H, W]`` to features ``[B, feature_dim]``."""
        _check_images(x, self.in_channels)
        return self.pool(self.stages(x)).flatten(1)


# ------------------------------------------------------------------------- torchvision ResNet
_RESNETS = ("resnet18", "resnet34", "resnet50")


class TorchvisionResNet(nn.Module):
    """Adapter for torchvision's ResNet-18/34/50 (random init; weights are never downloaded).

    With ``small_images=True`` the ImageNet stem (7x7 stride-2 conv and max-pool, which
    shrink the input 4x) is replaced by a 3x3 stride-1 conv without pooling: the CIFAR
    variant used by lightly and solo-learn for 32 px images. The classifier ``fc`` is
    replaced by ``Identity`` so the forward returns the pooled features.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: image channels (the first conv is rebuilt when it is not 3).
        small_images: use the CIFAR stem (default True).

    Attributes:
        feature_dim: 512 for ResNet-18/34, 2048 for ResNet-50.
        model: the wrapped ``torchvision.models.ResNet``.
    """

    def __init__(self, name: str = "resnet18", in_channels: int = 3, small_images: bool = True):
        super().__init__()
        check_choice("name", name, _RESNETS)
        check_positive_int("in_channels", in_channels)
        import torchvision  # deferred: only this adapter needs it

        model = getattr(torchvision.models, name)(weights=None)
        if small_images:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if small_images or in_channels != 3:
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim: int = model.fc.in_features
        model.fc = nn.Identity()
        self.model = model
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[B, C, H, W]`` to features ``[B, feature_dim]``."""
        _check_images(x, self.in_channels)
        return self.model(x)


# ------------------------------------------------------------------------------- registry
# name -> (class, preset keyword arguments); user kwargs override presets.
BACKBONES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "convnet": (ConvNet, {}),
    "vit": (SmallViT, {}),  # 192-d, 6 blocks, 3 heads: CPU-sized
    "vit_t": (SmallViT, {"embed_dim": 192, "depth": 12, "num_heads": 3}),  # ViT-Ti (DeiT)
    "vit_s": (SmallViT, {"embed_dim": 384, "depth": 12, "num_heads": 6}),  # ViT-S (DINO)
    "resnet18": (TorchvisionResNet, {"name": "resnet18"}),
    "resnet34": (TorchvisionResNet, {"name": "resnet34"}),
    "resnet50": (TorchvisionResNet, {"name": "resnet50"}),
}


def build_backbone(name: str, *, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a backbone by name; every result has an integer ``feature_dim``.

    Names: ``"convnet"`` (:class:`ConvNet`), ``"vit"`` (:class:`SmallViT` defaults),
    ``"vit_t"`` (192-d, 12 blocks, 3 heads), ``"vit_s"`` (384-d, 12 blocks, 6 heads),
    ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (:class:`TorchvisionResNet`) and
    ``"timm:<model_name>"`` (:class:`TimmBackbone`).

    ``image_size`` sets defaults that ``kwargs`` may override: the ViTs size their
    positional embedding for it and use 4 px patches up to 64 px images, 16 px patches
    above; the ResNets use the small-image stem up to 64 px. ConvNet ignores it.

    Args:
        name: the backbone name (see above).
        in_channels: image channels.
        image_size: the side of the global views the model is trained on.
        **kwargs: extra constructor arguments of the chosen class.

    Raises:
        ValueError: for an unknown name (naming ``backbone`` and listing the known ones) or
            an argument the chosen class does not take.
        ImportError: for ``"timm:..."`` when timm is not installed.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    if isinstance(name, str) and name.startswith("timm:"):
        model_name = name[len("timm:") :]
        if not model_name:
            raise ValueError("backbone 'timm:' needs a model name, e.g. 'timm:resnet18'")
        return TimmBackbone(model_name, in_channels=in_channels, image_size=image_size, **kwargs)
    if name not in BACKBONES:
        known = ", ".join([*BACKBONES, "timm:<model_name>"])
        raise ValueError(f"backbone must be one of {known}; got {name!r}")
    cls, preset = BACKBONES[name]
    options: dict[str, Any] = {**preset, "in_channels": in_channels}
    if cls is SmallViT:
        options.update(image_size=image_size, patch_size=4 if image_size <= 64 else 16)
    elif cls is TorchvisionResNet:
        options.update(small_images=image_size <= 64)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"backbone {name!r} does not take argument(s) {unknown}; it takes {sorted(accepted)}"
        )
    options.update(kwargs)
    return cls(**options)
