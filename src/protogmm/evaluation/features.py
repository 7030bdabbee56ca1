"""Feature extraction for frozen-encoder evaluation (k-NN, linear probe)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module | None,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Run a frozen encoder over labelled batches and return ``(features, labels)`` on CPU.

    The encoder is put in eval mode for the pass (batch-norm running statistics, no dropout)
    and its previous mode is restored afterwards.

    Args:
        encoder: maps ``[B, C, H, W]`` images to ``[B, D]`` features; ``None`` returns the
            flattened pixels (the raw-pixel baseline of design.md §9).
        batches: an iterable of ``(images, labels)``, e.g. a DataLoader with an eval transform.
        device: where the encoder runs.

    Returns:
        ``features`` ``[N, D]`` float32 and ``labels`` ``[N]`` int64, both on CPU.
    """
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval()
    features, labels = [], []
    try:
        for images, targets in batches:
            images = images.to(device, non_blocking=True)
            out = images.flatten(1) if encoder is None else encoder(images)
            features.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        if encoder is not None:
            encoder.train(was_training)
    if not features:
        raise ValueError("batches is empty: no features to extract")
    return torch.cat(features), torch.cat(labels)
