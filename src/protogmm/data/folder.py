"""Class-folder image datasets (torchvision's ImageFolder layout) with one-line errors.

Layout, as ImageNet or iNaturalist sit on disk and as ``torchvision.datasets.ImageFolder``
reads them::

    root/<class name>/<any/sub/folders>/<image file>

Class indices follow the sorted class-folder names. Listing uses torchvision's
``make_dataset`` (sorted walk, symlinks followed); on top of it this module adds what
ImageFolder does not do:

- every format Pillow can decode is accepted (:data:`IMAGE_EXTENSIONS`, case-insensitive),
  not only torchvision's nine extensions; hidden files and folders (names starting with
  ``.``, e.g. macOS ``._photo.jpg`` resource forks or ``.ipynb_checkpoints``) are ignored;
- an unreadable file (zero bytes, not an image, corrupt or truncated data) raises
  :class:`protogmm.data.bad_images.BadImageError` naming the file, whichever way Pillow
  fails on it; the image is decoded completely inside :func:`decode_image`, so a truncated
  file cannot slip through to fail later inside a transform;
- a missing root, a root without class folders, or a class folder without images is a
  one-line error naming the path.

Decoding relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that
sets it to True makes Pillow pad truncated images silently, and they then pass as good.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset

from protogmm.data.bad_images import BadImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassFolderImages",
    "check_same_classes",
    "class_folder_names",
    "decode_image",
]

Transform = Callable[[Image.Image], Any]


def _decodable_extensions() -> frozenset[str]:
    """File extensions of every format Pillow can open and decode.

    Stub formats (HDF5, GRIB, BUFR, WMF: Pillow identifies them but needs an external
    handler to decode) and MPEG (a video container) are left out, so data files that merely
    share those extensions are not listed as images.
    """
    Image.init()
    skipped_formats = {"MPEG"}
    extensions = set()
    for extension, image_format in Image.registered_extensions().items():
        if image_format not in Image.OPEN or image_format in skipped_formats:
            continue
        factory = Image.OPEN[image_format][0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue
        extensions.add(extension.lower())
    return frozenset(extensions)


#: Lower-case extensions (with the dot) of the files listed as images.
IMAGE_EXTENSIONS: frozenset[str] = _decodable_extensions()

_MODES = {1: "L", 3: "RGB"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(path: str | os.PathLike[str], mode: str) -> Image.Image:
    """Open and fully decode one image file, converted to ``mode`` (``"L"`` or ``"RGB"``).

    Any failure while reading the file is the file's fault (Pillow's plugins raise
    ``OSError``, ``SyntaxError``, ``ValueError``, ``struct.error`` ... on bad data), so every
    exception except ``MemoryError`` becomes one :class:`BadImageError` naming the file.

    Raises:
        BadImageError: the file is empty, not an image Pillow reads, or its data is corrupt
            or truncated.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(f"unreadable image {path}: empty file (0 bytes)", path=path)
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not in a transform
            return image.convert(mode)
    except BadImageError:
        raise
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        reason = "not an image file Pillow can read"
    except Exception as error:  # noqa: BLE001 (see the docstring: any decoding failure)
        reason = f"corrupt or truncated image data ({type(error).__name__}: {error})"
    raise BadImageError(f"unreadable image {path}: {reason}", path=path)


def class_folder_names(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class folders directly under ``root`` (hidden folders ignored).

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name)
    )
    if not names:
        raise FileNotFoundError(
            f"no class folders in {root}: expected {root}/<class name>/<image files>"
        )
    return names


def check_same_classes(
    classes_a: Sequence[str], where_a: str, classes_b: Sequence[str], where_b: str
) -> None:
    """Raise a one-line ``ValueError`` when two splits do not have the same class folders."""
    only_a = sorted(set(classes_a) - set(classes_b))
    only_b = sorted(set(classes_b) - set(classes_a))
    if only_a or only_b:
        raise ValueError(
            f"class folders differ between {where_a} and {where_b}: only in {where_a}: "
            f"{only_a}, only in {where_b}: {only_b}"
        )


class ClassFolderImages(Dataset):
    """Images in class folders (ImageFolder layout), decoded lazily with Pillow.

    ``dataset[i]`` decodes ``samples[i]`` and returns ``(image, label)``: a PIL image in mode
    ``"L"`` (``in_channels=1``) or ``"RGB"`` (3), passed through ``transform`` when given.
    Images keep their own size; the training and evaluation transforms crop and resize.

    Attributes:
        root: the folder.
        classes: sorted class-folder names; label ``c`` is ``classes[c]``.
        samples: ``(path, label)`` pairs in torchvision's order (by class, then path), the
            one source of truth for labels: a file that fails to decode never shifts them.
        labels: ``np.ndarray`` int64 ``[N]``, the labels of ``samples``.
        num_classes, in_channels: as named.

    Args:
        root: the folder holding one sub-folder per class.
        in_channels: 1 (grayscale) or 3 (RGB); every image is converted to it.
        transform: applied to the decoded PIL image.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder, or a class folder
            holds no image file (the message names the folder).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        in_channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        if isinstance(in_channels, bool) or in_channels not in _MODES:
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        self.root = Path(root)
        self.classes = class_folder_names(self.root)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = make_dataset(
            str(self.root), self.class_to_idx, is_valid_file=_is_image_file, allow_empty=True
        )
        found = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        empty = [self.classes[c] for c in np.flatnonzero(found == 0)]
        if empty:
            raise FileNotFoundError(
                f"class folder {self.root / empty[0]} holds no image files"
                + (f" (nor do {len(empty) - 1} other class folder(s))" if len(empty) > 1 else "")
            )
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)
        self.in_channels = in_channels
        self.mode = _MODES[in_channels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = decode_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, "
            f"{self.num_classes} classes, mode={self.mode!r})"
        )
