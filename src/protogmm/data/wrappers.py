"""Dataset wrappers that keep labels attached: a labelled subset and a late transform.

Every labelled dataset of :mod:`protogmm.data` exposes ``labels`` (``np.ndarray`` int64),
``classes`` and ``num_classes``; file-backed ones also ``samples`` (``(path, label)``
pairs). ``torch.utils.data.Subset`` drops those attributes, so long-tail subsampling,
train/held-out splits and the removal of unreadable files use :class:`LabelledSubset`,
which keeps them (restricted to the chosen indices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["LabelledSubset", "TransformedDataset"]


class LabelledSubset(Dataset):
    """The samples ``indices`` of a labelled dataset, with its labelled attributes.

    ``LabelledSubset(ds, idx)[i] == ds[idx[i]]``; ``labels``, ``samples`` (when ``ds`` has
    them), ``classes`` and ``num_classes`` follow. Nesting flattens to one level of
    indices into the innermost dataset.

    Args:
        dataset: a labelled dataset.
        indices: positions in ``dataset`` (any order, each in ``[0, len(dataset))``).

    Raises:
        ValueError: an index is out of range.
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(dataset)):
            raise ValueError(
                f"indices must lie in [0, {len(dataset)}), got values from {indices.min()} to "
                f"{indices.max()}"
            )
        if isinstance(dataset, LabelledSubset):
            dataset, indices = dataset.dataset, dataset.indices[indices]
        self.dataset = dataset
        self.indices = indices
        self.labels = np.asarray(dataset.labels, dtype=np.int64)[indices]
        self.classes = dataset.classes
        self.num_classes = len(dataset.classes)
        if hasattr(dataset, "samples"):
            self.samples = [dataset.samples[i] for i in indices]
        if hasattr(dataset, "root"):
            self.root = dataset.root

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[int(self.indices[index])]


class TransformedDataset(Dataset):
    """Apply ``transform`` to the image of every ``(image, label)`` item of ``dataset``.

    Lets one base dataset (built with ``transform=None``) serve training views and
    evaluation views, after subsetting and the unreadable-file policy, which must see the
    raw image.

    Args:
        dataset: returns ``(image, label)``.
        transform: maps the image to what the loader batches (a tensor, a list of views).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        if not callable(transform):
            raise ValueError(f"transform must be callable, got {type(transform).__name__}")
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label
