"""Encoders (backbones) for small and large images, and a registry to build them by name.

Every backbone maps images ``[B, C, H, W]`` to a feature vector ``[B, feature_dim]`` and has
an integer attribute ``feature_dim``; the projection head (:mod:`protogmm.models.heads`) is
built on top of it. Multi-crop training feeds the same encoder global views (e.g. 28 px) and
smaller local views (e.g. 12 px), so every backbone here accepts several input sizes.

Sources: DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021) for the ViT initialisation and positional-embedding interpolation; ViT
(Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) for the architecture; iBOT
(Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022) for the mask
token of masked-image modelling.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protogmm._checks import check_choice, check_in_range, check_positive_int

__all__ = [
    "BACKBONES",
    "ConvNet",
    "SmallViT",
    "TimmBackbone",
    "TorchvisionResNet",
    "build_backbone",
]


def _check_images(x: object, in_channels: int, min_size: int = 1) -> Tensor:
    """Raise a one-line ValueError unless ``x`` is a float ``[B, in_channels, H, W]`` tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"x must be at least {min_size} px on each side, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x


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


# --------------------------------------------------------------------------------- SmallViT
class SmallViT(nn.Module):
    """A Vision Transformer for small images, with a [CLS] token and an iBOT mask token.

    Patch embedding is a ``patch_size`` x ``patch_size`` stride-``patch_size`` conv (ViT,
    Dosovitskiy et al. 2021), so an input side that is not a multiple of ``patch_size`` is
    floored to whole patches. Blocks are pre-norm (``norm_first``) transformer layers with
    GELU, followed by a final LayerNorm, as in DINO's ``vision_transformer.py``. The learned
    positional embedding is sized for ``image_size`` and interpolated bicubically for other
    grid sizes (DINO's ``interpolate_pos_encoding``), so multi-crop local views work.

    For masked-image modelling (iBOT, Zhou et al. 2022), :meth:`forward_tokens` accepts a
    boolean patch mask; masked patch embeddings are replaced by the learnable ``mask_token``
    before the positional embedding is added.

    Initialisation follows DINO: truncated normal (std 0.02) for the positional embedding,
    the [CLS] and mask tokens and every linear weight, zero biases, unit LayerNorms.

    Args:
        image_size: the training image side the positional embedding is sized for.
        patch_size: patch side in pixels.
        in_channels: image channels.
        embed_dim: token dimension ``D`` (``feature_dim``).
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: hidden width of the block MLP relative to ``embed_dim``.

    Attributes:
        feature_dim: ``embed_dim``.
        cls_token, mask_token: ``[1, 1, D]`` parameters.
        pos_embed: ``[1, 1 + (image_size // patch_size) ** 2, D]`` parameter.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        check_positive_int("image_size", image_size)
        check_positive_int("patch_size", patch_size)
        check_positive_int("in_channels", in_channels)
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("depth", depth)
        check_positive_int("num_heads", num_heads)
        check_in_range("mlp_ratio", mlp_ratio, 0.0, math.inf, low_inclusive=False)
        if patch_size > image_size:
            raise ValueError(f"patch_size must be <= image_size={image_size}, got {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim={embed_dim}, got {num_heads}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = image_size // patch_size
        self.feature_dim: int = embed_dim
        #: It gives its [CLS] and patch tokens (:meth:`forward_tokens`): iBOT can use it.
        self.patch_tokens = True

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, embed_dim))
        # A plain ModuleList, not nn.TransformerEncoder: the latter warns that its
        # nested-tensor fast path is off for norm_first layers, and adds nothing here.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                embed_dim,
                num_heads,
                dim_feedforward=round(embed_dim * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=1e-6,  # DINO's ViT uses LayerNorm(eps=1e-6)
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.pos_embed, self.cls_token, self.mask_token):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                # MHA keeps q, k, v in one raw parameter (not an nn.Linear); DINO's qkv Linear
                # gets the same trunc-normal init as every other linear layer.
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
                if module.in_proj_bias is not None:
                    nn.init.zeros_(module.in_proj_bias)

    def num_patches(self, image_size: int) -> int:
        """Number of patch tokens for a square ``image_size`` input (floor to whole patches)."""
        check_positive_int("image_size", image_size)
        return (image_size // self.patch_size) ** 2

    def _pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """The ``[1, 1 + grid_h * grid_w, D]`` positional embedding for a patch grid."""
        if grid_h == grid_w == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_tokens(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode images into the [CLS] token and the patch tokens (after the final norm).

        Args:
            x: images ``[B, C, H, W]`` with ``H, W >= patch_size``.
            mask: optional boolean patch mask, ``[B, P]`` or ``[B, h, w]`` with
                ``h = H // patch_size``, ``w = W // patch_size``, ``P = h * w``; True marks
                a patch whose embedding is replaced by ``mask_token`` (iBOT).

        Returns:
            ``(cls, patches)``: ``[B, D]`` and ``[B, P, D]``.

        Raises:
            ValueError: on a malformed ``x`` or ``mask``.
        """
        _check_images(x, self.in_channels, min_size=self.patch_size)
        tokens = self.patch_embed(x)  # [B, D, h, w]
        batch, _, grid_h, grid_w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, P, D]
        if mask is not None:
            expected = (batch, grid_h * grid_w)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError("mask must be a bool torch.Tensor")
            if tuple(mask.shape) not in (expected, (batch, grid_h, grid_w)):
                raise ValueError(
                    f"mask must have shape {expected} or {(batch, grid_h, grid_w)}, "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.reshape(batch, -1, 1)
            tokens = torch.where(mask, self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], 1)
        tokens = tokens + self._pos_embed(grid_h, grid_w)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:]

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[B, C, H, W]`` to the [CLS] features ``[B, D]``."""
        return self.forward_tokens(x)[0]


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


# ---------------------------------------------------------------------------------- timm
#: timm modules whose models are ``VisionTransformer``s (they take ``img_size`` and
#: ``dynamic_img_size``).
_TIMM_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


class TimmBackbone(nn.Module):
    """Adapter for any ``timm`` model (random init), returning its pooled features.

    Built with ``timm.create_model(name, pretrained=False, num_classes=0,
    in_chans=in_channels, **kwargs)``; ``num_classes=0`` makes timm return pooled features.

    A timm Vision Transformer (``timm:vit_small_patch16_224``, ``timm:vit_base_patch16_224``,
    DeiT, ...) also gives its tokens, as :class:`SmallViT` does, so every host runs on it:
    :meth:`forward_tokens` returns the [CLS] and patch tokens after the final norm, with the
    patches a boolean mask marks replaced by a learned ``mask_token`` (iBOT's, zero-mean
    normal init, std 0.02; it is not part of the timm model, so an exported encoder loads
    into timm unchanged). Its defaults: ``img_size`` the run's global-crop size (the
    positional embedding's grid), ``dynamic_img_size=True`` and ``dynamic_img_pad=True``, so
    local crops of another size (DINO's 96 px beside 224 px) interpolate the positional
    embedding without flags, and a side that is not a multiple of the patch is padded.

    Args:
        name: a timm model name, e.g. ``"vit_small_patch16_224"``.
        in_channels: image channels.
        image_size: the global views' side (a ViT's default ``img_size``); None: timm's.
        **kwargs: passed to ``timm.create_model`` (they override the defaults above).

    Attributes:
        feature_dim: the model's ``num_features``.
        patch_tokens: True for a ViT (it has :meth:`forward_tokens` and ``grid_size``).

    Raises:
        ImportError: if timm is not installed.
    """

    def __init__(
        self, name: str, in_channels: int = 3, image_size: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        try:
            import timm
            from timm.models.vision_transformer import VisionTransformer
        except ImportError as error:
            raise ImportError(
                f"TimmBackbone({name!r}) needs the package timm: pip install timm"
            ) from error
        vit = timm.models.model_entrypoint(name).__module__ in _TIMM_VIT_MODULES
        if vit:
            kwargs = {"dynamic_img_size": True, "dynamic_img_pad": True, **kwargs}
            if image_size is not None:
                kwargs.setdefault("img_size", image_size)
        self.model = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs
        )
        self.feature_dim: int = int(self.model.num_features)
        self.in_channels = in_channels
        self.patch_tokens = (
            isinstance(self.model, VisionTransformer) and self.model.global_pool == "token"
        )
        if self.patch_tokens:
            self.grid_size = int(self.model.patch_embed.grid_size[0])
            self.patch_size = int(self.model.patch_embed.patch_size[0])
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[B, C, H, W]`` to features ``[B, feature_dim]``."""
        return self.model(x)

    def forward_tokens(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A ViT's [CLS] ``[B, D]`` and patch tokens ``[B, P, D]`` after the final norm.

        Args:
            x: images ``[B, C, H, W]``.
            mask: optional boolean ``[B, P]`` or ``[B, h, w]``: True replaces that patch's
                embedding by ``mask_token`` before the positional embedding (iBOT).

        Raises:
            ValueError: the model is not a ViT with a [CLS] token, or a malformed ``mask``.
        """
        if not self.patch_tokens:
            raise ValueError("forward_tokens needs a timm ViT with a [CLS] token")
        _check_images(x, self.in_channels, min_size=self.patch_size)
        model = self.model
        tokens = model.patch_embed(x)  # [B, h, w, D] with dynamic_img_size, else [B, P, D]
        if mask is not None:
            batch, patches = tokens.shape[0], tokens[0, ..., 0].numel()
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError("mask must be a bool torch.Tensor")
            if mask.shape[0] != batch or mask[0].numel() != patches:
                raise ValueError(
                    f"mask must hold {patches} patches for each of {batch} images, "
                    f"got shape {tuple(mask.shape)}"
                )
            keep_shape = mask.reshape(*tokens.shape[:-1], 1)
            tokens = torch.where(keep_shape, self.mask_token.to(tokens.dtype), tokens)
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))
        tokens = model.norm(model.blocks(tokens))
        return tokens[:, 0], tokens[:, model.num_prefix_tokens :]


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
