"""Class-folder image datasets (torchvision's ImageFolder layout) with one-line errors.

Layout, as ImageNet or iNaturalist sit on disk and as ``torchvision.datasets.ImageFolder``
reads them::

    root/<class name>/<any/sub/folders>/<image file>

Class indices follow the sorted class-folder names, and samples come in torchvision's
order (by class, then sorted path). On top of ImageFolder this module adds:

- every format Pillow can decode is accepted (:data:`IMAGE_EXTENSIONS`, case-insensitive),
  not only torchvision's nine extensions; hidden files and folders (names starting with
  ``.``, e.g. macOS ``._photo.jpg`` resource forks or ``.ipynb_checkpoints``), at any
  depth, are ignored;
- symlinks are followed, but each folder is walked once and each file listed once
  (:func:`list_class_files`): a link back to an ancestor (a loop) or to a folder or file
  already listed is skipped with a warning naming the link, where ImageFolder's
  ``os.walk(followlinks=True)`` lists the same files again and again, under whichever
  class the link sits in;
- an unreadable file (zero bytes, not an image, corrupt or truncated data) raises
  :class:`protogmm.data.bad_images.BadImageError` naming the file, whichever way Pillow
  fails on it; the image is decoded completely inside :func:`decode_image`, so a truncated
  file cannot slip through to fail later inside a transform;
- an image whose header declares more than ``max_image_pixels`` pixels
  (:data:`MAX_IMAGE_PIXELS` by default) is refused the same way before it is decoded: a
  few KB of PNG can declare 12,000 x 12,000 pixels, 432 MB once decoded to RGB;
- 16-bit and floating-point images are scaled into 8 bits (see :func:`decode_image`),
  where Pillow's ``convert`` clips them (a 16-bit image turns white, a float one black);
- a missing root, a root without class folders, or a class folder without images is a
  one-line error naming the path.

The listing itself (walk, links, hidden files) lives in :mod:`protogmm.data.listing`; its
public names are importable from here as before.

Decoding relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that
sets it to True makes Pillow pad truncated images silently, and they then pass as good.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from protogmm.data.bad_images import BadImageError, display_path

# The listing lives in protogmm.data.listing; its public names stay importable from here.
from protogmm.data.listing import IMAGE_EXTENSIONS, class_folder_names, list_class_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ClassFolderImages",
    "check_same_classes",
    "class_folder_names",
    "decode_image",
    "list_class_files",
]

#: Default limit on the pixels an image file may declare (width x height), checked from the
#: header before decoding: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about 89.5
#: megapixels, 268 MB as RGB), above which Pillow only warns up to twice as many. Larger
#: files are bad images (``data.images.on_bad`` applies); pass ``max_image_pixels`` to read
#: bigger ones (beyond twice Pillow's limit, raise ``PIL.Image.MAX_IMAGE_PIXELS`` too).
MAX_IMAGE_PIXELS = 89_478_485

Transform = Callable[[Image.Image], Any]

_MODES = {1: "L", 3: "RGB"}


def _to_8bit(image: Image.Image, path: str) -> Image.Image:
    """``image`` with 16-bit, 32-bit integer or float samples scaled into 8 bits (mode "L").

    Pillow's ``convert`` clips such samples to 0..255, so a 16-bit image turns white and a
    float one black. The rule (other modes are returned unchanged):

    - ``I;16*`` (16-bit PNG, TIFF): the high byte (``value >> 8``), as Pillow itself reads
      16-bit RGB files; an 8-bit image saved as 16 bits (``value * 257``) comes back exact;
    - ``I`` (32-bit integers: 16-bit PPM/PGM, integer TIFF): read as 16-bit data the same
      way when every value lies in 0..65535, else refused;
    - ``F`` (32-bit float TIFF): ``round(value * 255)`` when every value lies in [0, 1],
      else refused (NaN, infinity, or another scale that cannot be guessed safely:
      rescaling each image by its own range would change its brightness from file to file).

    Raises:
        BadImageError: a refused image, naming the file, its mode and its range of values.
    """
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return image
    values = np.asarray(image)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise BadImageError(
                f"unreadable image {display_path(path)}: float image (mode F) with values "
                f"in [{low:g}, {high:g}]; only [0, 1] is read (save it as 8 or 16 bits)",
                path=path,
            )
        pixels = np.rint(values * 255.0).astype(np.uint8)
    else:
        if low < 0 or high > 65535:
            raise BadImageError(
                f"unreadable image {display_path(path)}: integer image (mode {image.mode}) "
                f"with values in [{low:g}, {high:g}]; only 0..65535 (16 bits) is read",
                path=path,
            )
        pixels = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(pixels)  # uint8 [H, W]: mode "L"


def decode_image(
    path: str | os.PathLike[str],
    mode: str,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open and fully decode one image file, converted to ``mode`` (``"L"`` or ``"RGB"``).

    The header's size is checked against ``max_image_pixels`` before any pixel is decoded
    (Pillow's ``Image.open`` reads only the header). 16-bit, 32-bit integer and float
    images are scaled into 8 bits before the conversion (rule in :func:`_to_8bit`).

    Any failure while reading the file is the file's fault (Pillow's plugins raise
    ``OSError``, ``SyntaxError``, ``ValueError``, ``struct.error`` ... on bad data), so every
    exception except ``MemoryError`` becomes one :class:`BadImageError` naming the file.

    Args:
        path: the image file.
        mode: the Pillow mode of the result.
        max_image_pixels: most pixels (width x height) a file may declare; ``None``: no
            limit of ours (Pillow still refuses twice its ``Image.MAX_IMAGE_PIXELS``).

    Raises:
        BadImageError: the file is empty, not an image Pillow reads, declares more than
            ``max_image_pixels`` pixels, holds float or integer values out of the range
            read, or its data is corrupt or truncated.
    """
    path = os.fspath(path)
    shown = display_path(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(f"unreadable image {shown}: empty file (0 bytes)", path=path)
        with Image.open(path) as image:
            width, height = image.size
            if max_image_pixels is not None and width * height > max_image_pixels:
                # Refused before load(): a small file can decode to gigabytes.
                raise BadImageError(
                    f"unreadable image {shown}: too large, {width} x {height} = "
                    f"{width * height:,} pixels, over the limit of {max_image_pixels:,} "
                    "(a decompression bomb?); raise max_image_pixels to read it",
                    path=path,
                )
            image.load()  # decode now: a truncated file fails here, not in a transform
            return _to_8bit(image, path).convert(mode)
    except BadImageError:
        raise
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        reason = "not an image file Pillow can read"
    except Image.DecompressionBombError as error:  # over twice PIL.Image.MAX_IMAGE_PIXELS
        reason = f"too large ({error})"
    except Exception as error:  # noqa: BLE001 (see the docstring: any decoding failure)
        reason = f"corrupt or truncated image data ({type(error).__name__}: {error})"
    raise BadImageError(f"unreadable image {shown}: {reason}", path=path)


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
        max_image_pixels: most pixels (width x height) an image file may declare; a larger
            one is a :class:`BadImageError` found from its header, before decoding.
            ``None``: no limit of ours.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder, or a class folder
            holds no image file (the message names the folder).
        ValueError: two class folders are one folder, or one links back to ``root`` (see
            :func:`list_class_files`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        in_channels: int = 3,
        transform: Transform | None = None,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        if isinstance(in_channels, bool) or in_channels not in _MODES:
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool)
            or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1
        ):
            raise ValueError(
                f"max_image_pixels must be a positive integer or None, got {max_image_pixels!r}"
            )
        self.root = Path(root)
        self.classes = class_folder_names(self.root)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = list_class_files(self.root, self.classes)
        found = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        empty = [self.classes[c] for c in np.flatnonzero(found == 0)]
        if empty:
            raise FileNotFoundError(
                f"class folder {display_path(self.root / empty[0])} holds no image files"
                + (f" (nor do {len(empty) - 1} other class folder(s))" if len(empty) > 1 else "")
            )
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)
        self.in_channels = in_channels
        self.mode = _MODES[in_channels]
        self.transform = transform
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = decode_image(path, self.mode, self.max_image_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, "
            f"{self.num_classes} classes, mode={self.mode!r})"
        )
