"""Feature extraction for frozen-encoder evaluation (k-NN, linear probe).

Two ways to run BatchNorm layers. Evaluation protocols (k-NN, linear probe; DINO's
``eval_knn.py``) use the running statistics (eval mode). The teacher's embeddings that the
prototypes are fitted to and the targets are built from are computed in *training* mode,
with each batch's own statistics (DINO never puts its teacher in eval mode): measuring
which prototypes the teacher's embeddings choose, or how spread those embeddings are, is
only faithful with batch statistics (``batch_statistics=True``). The two differ most early
in a run, while the running statistics still hold their initial values (after 16 steps at
BatchNorm's momentum 0.1, 0.9 ** 16 = 19 % of the initial variance of 1 is left in them).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset


@torch.no_grad()
def extract_features(
    encoder: nn.Module | None,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    *,
    batch_statistics: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run a frozen encoder over labelled batches and return ``(features, labels)`` on CPU.

    The encoder is put in eval mode for the pass (no dropout; BatchNorm running statistics
    unless ``batch_statistics``) and its previous mode is restored afterwards.

    Args:
        encoder: maps ``[B, C, H, W]`` images to ``[B, D]`` features; ``None`` returns the
            flattened pixels (the raw-pixel baseline of design.md §9).
        batches: an iterable of ``(images, labels)``, e.g. a DataLoader with an eval transform.
        device: where the encoder runs.
        batch_statistics: BatchNorm layers normalise each batch with its own statistics, as
            the teacher's do in training (the module docstring); their running statistics
            are left untouched. A last batch smaller than the one before it is normalised
            together with that one, so that a remainder of a few images gets the statistics
            of a whole batch.

    Returns:
        ``features`` ``[N, D]`` float32 and ``labels`` ``[N]`` int64, both on CPU.

    Raises:
        ValueError: ``batches`` is empty, or ``batch_statistics`` with a first batch of one
            image (no statistics to normalise it with).
    """
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval()
    on_batches = batch_statistics and encoder is not None
    features, labels = [], []
    previous: Tensor | None = None  # the batch before, for a smaller last one
    try:
        with _batch_norm_on_batches(encoder) if on_batches else contextlib.nullcontext():
            for images, targets in batches:
                images = images.to(device, non_blocking=True)
                if encoder is None:
                    out = images.flatten(1)
                elif on_batches:
                    out = _encode_with_batch_statistics(encoder, images, previous)
                    previous = images
                else:
                    out = encoder(images)
                features.append(out.float().cpu())
                labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        if encoder is not None:
            encoder.train(was_training)
    if not features:
        raise ValueError("batches is empty: no features to extract")
    return torch.cat(features), torch.cat(labels)


def _encode_with_batch_statistics(
    encoder: nn.Module, images: Tensor, previous: Tensor | None
) -> Tensor:
    """``encoder(images)`` with batch statistics; a batch smaller than ``previous`` is
    normalised together with it (only its own rows are returned)."""
    if previous is not None and images.shape[0] < previous.shape[0]:
        return encoder(torch.cat([previous, images]))[previous.shape[0] :]
    if images.shape[0] < 2:
        raise ValueError(
            "batch_statistics: a first batch of one image has no statistics to normalise "
            "it with; use batches of at least 2 images"
        )
    return encoder(images)


@contextlib.contextmanager
def _batch_norm_on_batches(encoder: nn.Module) -> Iterator[None]:
    """BatchNorm layers use each batch's statistics and leave their running ones untouched.

    In training mode without ``track_running_stats`` a BatchNorm layer normalises with the
    batch's mean and (biased) variance and neither reads nor updates its buffers; the
    layers' own settings come back afterwards. A ``SyncBatchNorm`` layer would pool the
    statistics of every process in training mode, a collective that hangs when one process
    embeds alone (the run report's long-tail analysis on rank 0) and that ties the result to
    the process count: it normalises with this process's batch, as the others do.
    """
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(layer.training, layer.track_running_stats) for layer in layers]
    for layer in layers:
        layer.training, layer.track_running_stats = True, False
        if isinstance(layer, nn.SyncBatchNorm):
            layer.forward = functools.partial(_local_batch_norm, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, (training, tracking) in zip(layers, saved, strict=True):
            layer.training, layer.track_running_stats = training, tracking
            layer.__dict__.pop("forward", None)


def _local_batch_norm(layer: nn.SyncBatchNorm, input: Tensor) -> Tensor:
    """``layer`` on this process's batch statistics alone, buffers untouched."""
    return F.batch_norm(input, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)


def extract_features_sharded(
    encoder: nn.Module | None,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    *,
    batch_statistics: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`extract_features` over ``loader``'s data set, shared by the processes.

    Under an initialised process group (torchrun, Lightning's DDP) each process extracts its
    share of the samples (its own loader with ``loader``'s batch size and workers), and the
    shares are gathered so that every process returns every row, in the data set's order:
    the same result as one process, in ``1 / world`` of the time. Without a process group
    it is :func:`extract_features` on ``loader``.

    The shares are every ``world``-th sample from the process's rank on; with
    ``batch_statistics`` they are whole batches of one process's loader instead (every
    ``world``-th batch, a smaller last batch with the batch before it), so that each
    sample is normalised with the same batch as in one process.

    The processes must hold the same encoder (``encoder`` on each); the caller makes sure
    its buffers agree (e.g. BatchNorm statistics, which DDP keeps per rank).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return extract_features(encoder, loader, device, batch_statistics=batch_statistics)
    world, rank = dist.get_world_size(), dist.get_rank()
    total = len(loader.dataset)  # type: ignore[arg-type]
    batch_size = int(loader.batch_size or 1)
    shares = [_share(total, world, source, batch_size, batch_statistics) for source in range(world)]
    shard = Subset(loader.dataset, shares[rank])
    # The gathers run on the backend's device: CUDA for NCCL, the CPU for gloo.
    gather_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    features, labels = _extract_shard(encoder, shard, loader, device, batch_statistics)
    width = torch.tensor([features.shape[1] if len(shard) else 0], device=gather_device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank with no rows still knows D
    rows = max(len(share) for share in shares)
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
    for source, share in enumerate(shares):
        index = torch.tensor(share, dtype=torch.long)
        out[index] = all_features[source][: len(share)].cpu()
        out_labels[index] = all_labels[source][: len(share)].cpu()
    return out, out_labels


def _share(total: int, world: int, rank: int, batch_size: int, whole_batches: bool) -> list[int]:
    """The sample indices process ``rank`` extracts, in order.

    Every ``world``-th sample from ``rank`` on; with ``whole_batches``, every ``world``-th
    batch of ``batch_size`` samples, a smaller last batch going with the batch before it
    (where :func:`extract_features` normalises it).
    """
    if not whole_batches:
        return list(range(rank, total, world))
    starts = list(range(0, total, batch_size))
    owner = [index % world for index in range(len(starts))]
    if len(starts) > 1 and total - starts[-1] < batch_size:
        owner[-1] = owner[-2]
    return [
        sample
        for index, start in enumerate(starts)
        if owner[index] == rank
        for sample in range(start, min(start + batch_size, total))
    ]


def _extract_shard(
    encoder: nn.Module | None,
    shard: Subset,
    loader: DataLoader,
    device: torch.device | str,
    batch_statistics: bool,
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
    return extract_features(encoder, shard_loader, device, batch_statistics=batch_statistics)
