"""Adapter for any ``timm`` model (:class:`TimmBackbone`), with a ViT's tokens for iBOT.

Built by :func:`protogmm.models.backbones.build_backbone` for ``"timm:<model_name>"``, and
importable from :mod:`protogmm.models.backbones` as before. timm itself is imported only
when a :class:`TimmBackbone` is built (it is an optional dependency).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from protogmm._checks import check_positive_int
from protogmm.models._images import check_images

__all__ = ["TimmBackbone"]

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
        check_images(x, self.in_channels, min_size=self.patch_size)
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
