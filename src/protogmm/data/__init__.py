"""Data: embedded and synthetic labelled images, multi-crop and evaluation transforms.

Pure PyTorch + torchvision (no Lightning). See ``datasets`` for the datasets and how to
get multiple views per image, ``augment`` for DINO multi-crop.
"""

from __future__ import annotations

from protogmm.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    MultiCropTransform,
    blur_kernel_size,
    eval_transform,
    normalization_stats,
)
from protogmm.data.datasets import (
    EmbeddedMNIST,
    MultiViewDataset,
    SyntheticImages,
    load_mnist5k,
    long_tail_counts,
    mnist5k_path,
    stratified_split,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "EmbeddedMNIST",
    "MultiCropTransform",
    "MultiViewDataset",
    "SyntheticImages",
    "blur_kernel_size",
    "eval_transform",
    "load_mnist5k",
    "long_tail_counts",
    "mnist5k_path",
    "normalization_stats",
    "stratified_split",
]
