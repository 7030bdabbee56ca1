"""The input check every backbone's forward shares: one-line errors, before any layer runs."""

from __future__ import annotations

from torch import Tensor


def check_images(x: object, in_channels: int, min_size: int = 1) -> Tensor:
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
