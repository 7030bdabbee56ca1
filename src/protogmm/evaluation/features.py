"""Feature extraction for frozen-encoder evaluation (k-NN, linear probe)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset


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


def extract_features_sharded(
    encoder: nn.Module | None, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """:func:`extract_features` over ``loader``'s data set, shared by the processes.

    Under an initialised process group (torchrun, Lightning's DDP) each process extracts every
    ``world``-th sample from its rank on (its own loader with ``loader``'s batch size and
    workers), and the shards are gathered so that every process returns every row, in the
    data set's order: the same result as one process, in ``1 / world`` of the time. Without
    a process group it is :func:`extract_features` on ``loader``.

    The processes must hold the same encoder (``encoder`` on each); the caller makes sure
    its buffers agree (e.g. BatchNorm statistics, which DDP keeps per rank).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return extract_features(encoder, loader, device)
    world, rank = dist.get_world_size(), dist.get_rank()
    total = len(loader.dataset)  # type: ignore[arg-type]
    shard = Subset(loader.dataset, range(rank, total, world))
    # The gathers run on the backend's device: CUDA for NCCL, the CPU for gloo.
    gather_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    features, labels = _extract_shard(encoder, shard, loader, device)
    width = torch.tensor([features.shape[1] if len(shard) else 0], device=gather_device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank with no rows still knows D
    rows = -(-total // world)
    padded = torch.zeros(rows, int(width), device=gather_device)
    padded_labels = torch.zeros(rows, dtype=torch.long, device=gather_device)
    if len(shard):
        padded[: len(shard)] = features.to(gather_device)
        padded_labels[: len(shard)] = labels.to(gather_device)
    all_features = [torch.empty_like(padded) for _ in range(world)]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(all_features, padded)
    dist.all_gather(all_labels, padded_labels)
    out = torch.empty(total, int(width))
    out_labels = torch.empty(total, dtype=torch.long)
    for source in range(world):  # rank r holds samples r, r + world, ...
        count = len(range(source, total, world))
        out[source::world] = all_features[source][:count].cpu()
        out_labels[source::world] = all_labels[source][:count].cpu()
    return out, out_labels


def _extract_shard(
    encoder: nn.Module | None, shard: Subset, loader: DataLoader, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    if len(shard) == 0:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    shard_loader = DataLoader(
        shard,
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        shuffle=False,
        generator=torch.Generator(),  # not the global RNG: training's stream stays put
    )
    return extract_features(encoder, shard_loader, device)
