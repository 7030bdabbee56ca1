"""A Vision Transformer for small images (:class:`SmallViT`), with an iBOT mask token.

Built by :func:`protogmm.models.backbones.build_backbone` as ``"vit"``, ``"vit_t"`` and
``"vit_s"``, and importable from :mod:`protogmm.models.backbones` as before.

Sources: DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021) for the ViT initialisation and positional-embedding interpolation; ViT
(Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) for the architecture; iBOT
(Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022) for the mask
token of masked-image modelling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protogmm._checks import check_in_range, check_positive_int
from protogmm.models._images import check_images

__all__ = ["SmallViT"]


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
        check_images(x, self.in_channels, min_size=self.patch_size)
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
