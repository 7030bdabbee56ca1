"""CIFAR-10 and CIFAR-100 from the official python-version files on local disk.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. protogmm never
downloads them: get ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html and extract them into a folder ``ROOT``:

- CIFAR-10: ``ROOT/cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5``
  (train), ``test_batch`` (test) and ``batches.meta`` (``label_names``);
- CIFAR-100: ``ROOT/cifar-100-python/`` with ``train``, ``test`` and ``meta``
  (``fine_label_names``); the 100 fine labels are used.

Each file is a pickled dict (``data``: uint8 ``[N, 3072]``, the red, green and blue planes
of a 32x32 image in row-major order; ``labels`` or ``fine_labels``), read as torchvision's
``CIFAR10`` reads it (``encoding="latin1"``). torchvision's class is not reused: with
``download=False`` it still md5-checks each file against the official archive, which any
locally rebuilt or test file fails. The unpickler here accepts only plain containers and
NumPy arrays, so a crafted file cannot run code (the rule ``torch.load`` follows with
``weights_only=True``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from protogmm._checks import check_choice
from protogmm.data.datasets import Transform, _LabelledImages

__all__ = ["CIFAR_VARIANTS", "CIFARImages", "cifar_folder", "read_cifar_pickle"]


_LAYOUT = {
    # variant: (folder, display name, train files, test files, meta file, names key, labels key)
    "cifar10": (
        "cifar-10-batches-py",
        "CIFAR-10",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": (
        "cifar-100-python",
        "CIFAR-100",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
    ),
}
CIFAR_VARIANTS = tuple(_LAYOUT)

_IMAGE_BYTES = 3 * 32 * 32


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists, strings, numbers and NumPy arrays; refuse any other global."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        # Files pickled before NumPy 2 name ``numpy.core``, now ``numpy._core``.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One CIFAR python-version file as a dict (string keys), arrays-only unpickling.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a pickled dict of plain values and arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as handle:
            content = _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # noqa: BLE001 (any unpickling failure: one line naming the file)
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"cannot read CIFAR file {path}: {reason}") from None
    if not isinstance(content, dict):
        raise ValueError(f"CIFAR file {path} must hold a dict, got {type(content).__name__}")
    return content


def cifar_folder(root: str | os.PathLike[str], variant: str = "cifar10") -> Path:
    """The folder holding ``variant``'s files: ``root/<official folder>`` or ``root`` itself.

    Raises:
        FileNotFoundError: neither holds the files; the message says where to put them.
    """
    check_choice("variant", variant, CIFAR_VARIANTS)
    folder, display, train, test, meta, _, _ = _LAYOUT[variant]
    root = Path(root)
    for candidate in (root / folder, root):
        if all((candidate / name).is_file() for name in (*train, *test, meta)):
            return candidate
    archive = "cifar-10-python.tar.gz" if variant == "cifar10" else "cifar-100-python.tar.gz"
    missing = [name for name in (*train, *test, meta) if not (root / folder / name).is_file()]
    raise FileNotFoundError(
        f"{display} not found: expected {root / folder}/ holding {', '.join(train + test)} and "
        f"{meta} (missing: {', '.join(missing)}); download {archive} (python version) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root} "
        "(protogmm never downloads data)"
    )


class CIFARImages(_LabelledImages):
    """CIFAR-10 or CIFAR-100 (32x32 RGB) read from local python-version files.

    Items are ``(PIL RGB image, label)``, passed through ``transform`` when given; samples
    keep the files' order (already random with the classes interleaved). Attributes as the
    other datasets of :mod:`protogmm.data.datasets`: ``images`` uint8 ``[N, 32, 32, 3]``,
    ``labels``, ``classes``, ``num_classes``, ``image_size`` (32), ``in_channels`` (3).

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or that
            folder itself); see the module docstring.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        variant: ``"cifar10"`` or ``"cifar100"``.
        transform: applied to the PIL image.

    Raises:
        FileNotFoundError: the files are not there (the message says where to put them).
        ValueError: a file is not in the format above (the message names it).
    """

    image_size = 32
    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        variant: str = "cifar10",
        transform: Transform | None = None,
    ) -> None:
        check_choice("split", split, ("train", "test"))
        folder = cifar_folder(root, variant)
        _, _, train, test, meta, names_key, labels_key = _LAYOUT[variant]
        names = read_cifar_pickle(folder / meta).get(names_key)
        if not isinstance(names, list) or not names:
            raise ValueError(f"CIFAR file {folder / meta} has no list {names_key!r}")
        self.classes = [str(name) for name in names]
        self.num_classes = len(self.classes)
        images, labels = [], []
        for name in train if split == "train" else test:
            batch_images, batch_labels = self._read_batch(folder / name, labels_key)
            images.append(batch_images)
            labels.append(batch_labels)
        self.images = np.concatenate(images)
        self.labels = np.concatenate(labels)
        self.root = folder
        self.split = split
        self.variant = variant
        self.transform = transform

    def _read_batch(self, path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
        content = read_cifar_pickle(path)
        data, labels = content.get("data"), content.get(labels_key)
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
            shape = getattr(data, "shape", type(data).__name__)
            raise ValueError(f"CIFAR file {path}: 'data' must be an [N, 3072] array, got {shape}")
        if data.dtype != np.uint8:
            raise ValueError(f"CIFAR file {path}: 'data' must be uint8, got {data.dtype}")
        try:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"CIFAR file {path}: {labels_key!r} must be integers") from None
        if len(labels) != len(data):
            raise ValueError(
                f"CIFAR file {path}: {len(labels)} {labels_key!r} for {len(data)} images"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"CIFAR file {path}: {labels_key!r} must lie in [0, {self.num_classes}), got "
                f"values from {labels.min()} to {labels.max()}"
            )
        # Planes [N, 3, 32, 32] -> images [N, 32, 32, 3], as PIL and torchvision expect.
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels
