"""Unreadable image files: the error that names them, a scan, and the skip policy.

Every real image collection holds a few broken files (zero bytes, an HTML page saved as
``.jpg``, a download cut short). Two policies, chosen by ``data.images.on_bad``:

- ``"error"`` (default): the first unreadable file stops the run with a
  :class:`BadImageError` naming it; with a scan (:func:`scan_images`) before training,
  the error names the first bad file and the count of all of them;
- ``"skip"``: with a scan, the bad files are dropped from the index before training
  (:func:`drop_bad_images`); without one, :class:`SkipBadImages` substitutes, at first
  touch, the next readable image *of the same class* (deterministic: the first readable
  one after it, cyclically, in the dataset's order), so batch sizes, epoch lengths and the
  label of every position stay what they were. Either way the skipped files are counted,
  logged (logger ``protogmm.data``) and reported at the end of the run.

Labels always come from the dataset's ``(path, label)`` index, never from a position in a
list of decoded images, so a skipped file cannot shift any other file's label.

File names are bytes on Linux and need not be UTF-8 (Python holds the bytes it cannot
decode as lone surrogates, which no text file or terminal accepts); every message and
report shows them through :func:`display_path`, while ``path`` attributes keep the name
that opens the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BadImage",
    "BadImageError",
    "SkipBadImages",
    "display_path",
    "drop_bad_images",
    "scan_images",
]

logger = logging.getLogger("protogmm.data")


def display_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``path`` as text that prints and encodes as UTF-8 anywhere (logs, JSON, Markdown).

    A name whose bytes are not UTF-8 (``b"\\xff\\xfe.png"``, which Python holds as
    ``"\\udcff\\udcfe.png"``) shows its bytes as ``\\xff`` escapes; any other name is
    returned unchanged.
    """
    try:
        raw = os.fsencode(path)  # the name's bytes on disk: surrogate escapes undone
    except UnicodeEncodeError:  # a lone surrogate that no file name could hold
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` names it (also in the message).

    Args:
        message: one line naming the file and what is wrong with it.
        path: the file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class BadImage:
    """One unreadable sample found by :func:`scan_images`."""

    index: int
    path: str
    reason: str


def scan_images(dataset: Dataset, workers: int | None = None) -> list[BadImage]:
    """Decode every sample of ``dataset`` once and list the unreadable ones, in index order.

    Decoding (Pillow) releases the GIL, so a thread pool overlaps file reads and decodes.

    Args:
        dataset: items raise :class:`BadImageError` for unreadable files (e.g.
            :class:`protogmm.data.folder.ClassFolderImages` built with ``transform=None``).
        workers: threads; default ``min(8, os.cpu_count())``.

    Returns:
        The bad samples, sorted by index (empty when every file decodes).
    """
    workers = workers or min(8, os.cpu_count() or 1)

    def probe(index: int) -> BadImage | None:
        try:
            dataset[index]
        except BadImageError as error:
            return BadImage(index, str(error.path), str(error))
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(probe, range(len(dataset)))  # type: ignore[arg-type]
        return [bad for bad in found if bad is not None]


def drop_bad_images(dataset: Any, bad: Sequence[BadImage]) -> np.ndarray:
    """Indices of ``dataset`` that :func:`scan_images` found readable (ascending).

    Raises:
        ValueError: every image of some class is unreadable (naming the class and one file).
    """
    keep = np.ones(len(dataset), dtype=bool)
    keep[[b.index for b in bad]] = False
    labels = np.asarray(dataset.labels)
    for c in np.unique(labels):
        if not keep[labels == c].any():
            first = next(b for b in bad if labels[b.index] == c)
            raise ValueError(
                f"every image of class {dataset.classes[c]!r} is unreadable "
                f"(e.g. {display_path(first.path)})"
            )
    return np.flatnonzero(keep)


class SkipBadImages(Dataset):
    """Substitute an unreadable image by the next readable one of the same class.

    ``SkipBadImages(dataset)[i]`` is ``dataset[i]`` when that decodes. When it raises
    :class:`BadImageError`, the file is flagged, logged once, and the first readable sample
    of the same class after ``i`` (cyclically, in ``dataset``'s order) takes its place; the
    returned label is always ``labels[i]``. The result depends only on which files are
    unreadable, not on the order in which samples were touched.

    The flags live in a shared-memory tensor, so DataLoader worker processes report into
    the same record the main process reads (:meth:`skipped_indices`), and a file found bad
    once is never decoded again.

    Args:
        dataset: labelled dataset (``labels``, ``classes``; ``samples`` of ``(path,
            label)`` for :meth:`skipped_paths`) whose items may raise :class:`BadImageError`.

    Raises:
        ValueError: from ``__getitem__``, when every image of the class is unreadable.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.classes = dataset.classes
        self.num_classes = len(self.classes)
        if hasattr(dataset, "samples"):
            self.samples = dataset.samples  # the (path, label) index, unchanged
        # Per class, its members in dataset order, and each sample's place in that list.
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
        self._members = order
        self._class_start = bounds[:-1]
        self._class_size = np.diff(bounds)
        self._position = np.empty(len(self.labels), dtype=np.int64)
        self._position[order] = np.arange(len(order)) - np.repeat(bounds[:-1], self._class_size)
        self._bad = torch.zeros(len(self.labels), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        label = int(self.labels[index])
        start, size = self._class_start[label], self._class_size[label]
        first_error = None
        for step in range(size):
            candidate = int(self._members[start + (self._position[index] + step) % size])
            if self._bad[candidate]:
                continue
            try:
                image, _ = self.dataset[candidate]
            except BadImageError as error:
                first_error = first_error or error
                self._bad[candidate] = 1
                logger.warning("skipping %s (data.images.on_bad=skip)", error)
                continue
            return image, label
        where = ""
        if first_error is not None:
            shown = first_error if first_error.path is None else display_path(first_error.path)
            where = f" (e.g. {shown})"
        raise ValueError(f"every image of class {self.classes[label]!r} is unreadable{where}")

    def skipped_indices(self) -> np.ndarray:
        """Indices (into ``dataset``) of the files found unreadable so far, ascending."""
        return np.flatnonzero(self._bad.numpy())

    def mark_skipped(self, indices: Sequence[int]) -> None:
        """Flag files as unreadable (e.g. flags gathered from other DDP ranks)."""
        self._bad[torch.as_tensor(list(indices), dtype=torch.long)] = 1

    def skipped_paths(self) -> list[str]:
        """Paths of the files found unreadable so far (needs ``dataset.samples``)."""
        return [self.dataset.samples[i][0] for i in self.skipped_indices()]
