"""Data: labelled image datasets, long-tailed subsets, unreadable files, multi-crop.

Pure PyTorch + torchvision (no Lightning). ``datasets``: embedded MNIST-5k and synthetic
long-tailed images; ``folder``: class folders (ImageFolder layout); ``cifar``: CIFAR-10/100
from local python pickles; ``longtail``: long-tailed subsampling; ``bad_images``: the
unreadable-file policies; ``wrappers``: labelled subsets and late transforms; ``augment``:
DINO multi-crop and the evaluation transform.
"""

from __future__ import annotations

from protogmm.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    ConvertMode,
    MultiCropTransform,
    blur_kernel_size,
    eval_transform,
    normalization_stats,
)
from protogmm.data.bad_images import (
    BadImage,
    BadImageError,
    SkipBadImages,
    drop_bad_images,
    scan_images,
)
from protogmm.data.cifar import CIFAR_VARIANTS, CIFARImages, cifar_folder, read_cifar_pickle
from protogmm.data.datasets import (
    EmbeddedMNIST,
    MultiViewDataset,
    SyntheticImages,
    hash_order,
    load_mnist5k,
    long_tail_counts,
    mnist5k_path,
    stratified_split,
)
from protogmm.data.folder import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ClassFolderImages,
    check_same_classes,
    class_folder_names,
    decode_image,
)
from protogmm.data.longtail import LongTailSubset, long_tail_subset
from protogmm.data.wrappers import LabelledSubset, TransformedDataset

__all__ = [
    "CIFAR_VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MNIST_MEAN",
    "MNIST_STD",
    "BadImage",
    "BadImageError",
    "CIFARImages",
    "ClassFolderImages",
    "ConvertMode",
    "EmbeddedMNIST",
    "LabelledSubset",
    "LongTailSubset",
    "MultiCropTransform",
    "MultiViewDataset",
    "SkipBadImages",
    "SyntheticImages",
    "TransformedDataset",
    "blur_kernel_size",
    "check_same_classes",
    "cifar_folder",
    "class_folder_names",
    "decode_image",
    "drop_bad_images",
    "eval_transform",
    "hash_order",
    "load_mnist5k",
    "long_tail_counts",
    "long_tail_subset",
    "mnist5k_path",
    "normalization_stats",
    "read_cifar_pickle",
    "scan_images",
    "stratified_split",
]
