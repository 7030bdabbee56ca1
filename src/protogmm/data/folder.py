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

Decoding relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that
sets it to True makes Pillow pad truncated images silently, and they then pass as good.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from protogmm.data.bad_images import BadImageError, display_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ClassFolderImages",
    "check_same_classes",
    "class_folder_names",
    "decode_image",
    "list_class_files",
]

logger = logging.getLogger("protogmm.data")

#: Default limit on the pixels an image file may declare (width x height), checked from the
#: header before decoding: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about 89.5
#: megapixels, 268 MB as RGB), above which Pillow only warns up to twice as many. Larger
#: files are bad images (``data.on_bad_image`` applies); pass ``max_image_pixels`` to read
#: bigger ones (beyond twice Pillow's limit, raise ``PIL.Image.MAX_IMAGE_PIXELS`` too).
MAX_IMAGE_PIXELS = 89_478_485

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


_Chain = tuple[tuple[int, int], ...]  # (st_dev, st_ino) of folders, outermost first
_Folder = tuple[str, str, int, _Chain]  # path, real path, label, chain (itself included)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def list_class_files(root: str | os.PathLike[str], classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image file under ``root/<classes[label]>``, each file once.

    Symlinks are followed, safely: every folder is walked at most once (folders are told
    apart by ``(st_dev, st_ino)``, so bind mounts count too) and every file is listed at
    most once (by its resolved real path). Everything reached without a symlink is listed
    first, so a file keeps the class of the folder it really sits in; a link is followed
    afterwards only to what is not listed yet. A link to a folder already walked, the link's
    own ancestors (a loop) or the image folder's, or to a file already listed, is skipped
    with a warning (logger ``protogmm.data``) naming the link. Hidden files and folders are
    ignored, and so (with a warning) is a sub-folder that cannot be read.

    Returns:
        The pairs sorted as torchvision's ``make_dataset`` sorts them: by label, then by
        folder path, then by file name.

    Raises:
        ValueError: two class folders are one folder (a link), or a class folder is a link
            to the image folder or one of its ancestors.
    """
    root = os.fspath(root)
    # The image folder and its ancestors: a link to any of them is a loop.
    above: set[tuple[int, int]] = set()
    real = os.path.realpath(root)
    while True:
        above.add(_identity(os.stat(real)))
        if os.path.dirname(real) == real:
            break
        real = os.path.dirname(real)

    walked: dict[tuple[int, int], str] = {}  # folder identity -> the path it was walked as
    listed: set[str] = set()  # real paths of the files listed
    found: list[tuple[int, str, str]] = []  # (label, folder, name)
    skipped: list[str] = []  # one line per skipped link
    # (label, path, identities of the folders from its class folder down to the link's)
    links: list[tuple[int, str, _Chain]] = []
    first_duplicate = ""

    def add_file(folder: str, name: str, label: int, real_path: str) -> bool:
        if real_path in listed:
            return False
        listed.add(real_path)
        found.append((label, folder, name))
        return True

    def walk(stack: list[_Folder]) -> None:
        """List the folders on ``stack`` and, depth first, their sub-folders; links wait."""
        while stack:
            folder, real_folder, label, chain = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError as error:
                logger.warning(
                    "skipping folder %s: cannot be read (%s)", display_path(folder), error
                )
                continue
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                if entry.is_symlink():
                    links.append((label, entry.path, chain))
                elif entry.is_dir(follow_symlinks=False):
                    key = _identity(entry.stat(follow_symlinks=False))
                    if key in walked:  # a bind mount of a folder walked already
                        skipped.append(
                            f"skipping folder {display_path(entry.path)}: the same folder as "
                            f"{display_path(walked[key])}, listed already"
                        )
                        continue
                    walked[key] = entry.path
                    real_sub = os.path.join(real_folder, entry.name)
                    stack.append((entry.path, real_sub, label, (*chain, key)))
                elif _is_image_file(entry.name):
                    add_file(folder, entry.name, label, os.path.join(real_folder, entry.name))

    # Class folders first (they may be links themselves): what they hold is theirs.
    starts: list[_Folder] = []
    for label, name in enumerate(classes):
        path = os.path.join(root, name)
        key = _identity(os.stat(path))
        if key in above:
            raise ValueError(
                f"class folder {display_path(path)} is a link to "
                f"{display_path(os.path.realpath(path))}, which holds the image folder itself"
            )
        if key in walked:
            raise ValueError(
                f"class folders {display_path(walked[key])} and {display_path(path)} are "
                f"the same folder ({display_path(os.path.realpath(path))}): a link?"
            )
        walked[key] = path
        starts.append((path, os.path.realpath(path), label, (key,)))
    walk(starts[::-1])

    # Then the links, in sorted order, round after round (a followed folder's own links
    # wait for the next round), so a real location always wins over a link to it.
    duplicates = 0
    while links:
        pending, links = sorted(links), []
        for label, path, chain in pending:
            name = os.path.basename(path)
            try:
                info = os.stat(path)
            except OSError:  # a dangling link: listed when named as an image, then unreadable
                if _is_image_file(name):
                    add_file(os.path.dirname(path), name, label, os.path.realpath(path))
                continue
            if not stat.S_ISDIR(info.st_mode):
                if _is_image_file(name) and not add_file(
                    os.path.dirname(path), name, label, os.path.realpath(path)
                ):
                    duplicates += 1
                    if not first_duplicate:
                        first_duplicate = (
                            f"{display_path(path)} -> {display_path(os.path.realpath(path))}"
                        )
                continue
            key = _identity(info)
            target = display_path(os.path.realpath(path))
            if key in chain or key in above:
                skipped.append(
                    f"skipping folder link {display_path(path)} -> {target}: a loop (the "
                    "link sits inside its target)"
                )
            elif key in walked:
                skipped.append(
                    f"skipping folder link {display_path(path)} -> {target}: listed already "
                    f"as {display_path(walked[key])}"
                )
            else:
                walked[key] = path
                walk([(path, os.path.realpath(path), label, (*chain, key))])
    for line in skipped[:_MAX_WARNINGS]:
        logger.warning("%s", line)
    if len(skipped) > _MAX_WARNINGS:
        logger.warning(
            "skipping %d more folder link(s) or repeated folder(s) in %s",
            len(skipped) - _MAX_WARNINGS,
            display_path(root),
        )
    if duplicates:
        logger.warning(
            "skipping %d file link(s) to image files listed already (first: %s)",
            duplicates,
            first_duplicate,
        )
    found.sort()
    return [(os.path.join(folder, name), label) for label, folder, name in found]


#: Skipped folder links named one warning each; the rest are counted in one more.
_MAX_WARNINGS = 20


def class_folder_names(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class folders directly under ``root`` (hidden folders ignored).

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {display_path(root)}")
    names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name)
    )
    if not names:
        shown = display_path(root)
        raise FileNotFoundError(
            f"no class folders in {shown}: expected {shown}/<class name>/<image files>"
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
