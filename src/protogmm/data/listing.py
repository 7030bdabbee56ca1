"""Listing the image files of a class-folder tree: the walk behind :mod:`protogmm.data.folder`.

Layout, as torchvision's ImageFolder reads it::

    root/<class name>/<any/sub/folders>/<image file>

What the listing adds to ImageFolder's ``os.walk(followlinks=True)``:

- every format Pillow can decode is listed (:data:`IMAGE_EXTENSIONS`, case-insensitive);
  hidden files and folders (names starting with ``.``), at any depth, are ignored;
- symlinks are followed, but each folder is walked once and each file listed once
  (:func:`list_class_files`): a link back to an ancestor (a loop) or to a folder or file
  already listed is skipped with a warning naming the link;
- names that are not UTF-8 are kept as Python holds them (lone surrogates), so the listed
  paths open the files, while every message shows them through
  :func:`protogmm.data.bad_images.display_path`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageFile

from protogmm.data.bad_images import display_path

__all__ = ["IMAGE_EXTENSIONS", "class_folder_names", "list_class_files"]

logger = logging.getLogger("protogmm.data")


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

#: Skipped folder links named one warning each; the rest are counted in one more.
_MAX_WARNINGS = 20

_Chain = tuple[tuple[int, int], ...]  # (st_dev, st_ino) of folders, outermost first
_Folder = tuple[str, str, int, _Chain]  # path, real path, label, chain (itself included)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _folder_and_ancestors(root: str) -> set[tuple[int, int]]:
    """Identities of the image folder and of every folder above it: a link to any is a loop."""
    above: set[tuple[int, int]] = set()
    real = os.path.realpath(root)
    while True:
        above.add(_identity(os.stat(real)))
        if os.path.dirname(real) == real:
            break
        real = os.path.dirname(real)
    return above


class _Listing:
    """The state of one :func:`list_class_files` call: what is walked, listed and skipped.

    Args:
        above: identities of the image folder and its ancestors (links to them are loops).
    """

    def __init__(self, above: set[tuple[int, int]]) -> None:
        self.above = above
        self.walked: dict[tuple[int, int], str] = {}  # folder identity -> path walked as
        self.listed: set[str] = set()  # real paths of the files listed
        self.found: list[tuple[int, str, str]] = []  # (label, folder, name)
        self.skipped: list[str] = []  # one line per skipped link
        # (label, path, identities of the folders from its class folder down to the link's)
        self.links: list[tuple[int, str, _Chain]] = []
        self.duplicates = 0  # file links to files listed already
        self.first_duplicate = ""

    def add_file(self, folder: str, name: str, label: int, real_path: str) -> bool:
        """List ``folder/name`` under ``label`` unless its real path is listed already."""
        if real_path in self.listed:
            return False
        self.listed.add(real_path)
        self.found.append((label, folder, name))
        return True

    def class_folders(self, root: str, classes: Sequence[str]) -> list[_Folder]:
        """The class folders to walk first (they may be links themselves), in label order.

        Raises:
            ValueError: a class folder holds the image folder, or is another class folder.
        """
        starts: list[_Folder] = []
        for label, name in enumerate(classes):
            path = os.path.join(root, name)
            key = _identity(os.stat(path))
            if key in self.above:
                raise ValueError(
                    f"class folder {display_path(path)} is a link to "
                    f"{display_path(os.path.realpath(path))}, which holds the image folder itself"
                )
            if key in self.walked:
                raise ValueError(
                    f"class folders {display_path(self.walked[key])} and {display_path(path)} "
                    f"are the same folder ({display_path(os.path.realpath(path))}): a link?"
                )
            self.walked[key] = path
            starts.append((path, os.path.realpath(path), label, (key,)))
        return starts

    def walk(self, stack: list[_Folder]) -> None:
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
                    self.links.append((label, entry.path, chain))
                elif entry.is_dir(follow_symlinks=False):
                    key = _identity(entry.stat(follow_symlinks=False))
                    if key in self.walked:  # a bind mount of a folder walked already
                        self.skipped.append(
                            f"skipping folder {display_path(entry.path)}: the same folder as "
                            f"{display_path(self.walked[key])}, listed already"
                        )
                        continue
                    self.walked[key] = entry.path
                    real_sub = os.path.join(real_folder, entry.name)
                    stack.append((entry.path, real_sub, label, (*chain, key)))
                elif _is_image_file(entry.name):
                    real_path = os.path.join(real_folder, entry.name)
                    self.add_file(folder, entry.name, label, real_path)

    def follow_links(self) -> None:
        """Follow the links found, in sorted order, round after round.

        A followed folder's own links wait for the next round, so a real location always
        wins over a link to it.
        """
        while self.links:
            pending, self.links = sorted(self.links), []
            for label, path, chain in pending:
                self._follow(label, path, chain)

    def _follow(self, label: int, path: str, chain: _Chain) -> None:
        """Follow one link: list the file it names, or walk the folder unless seen before."""
        name = os.path.basename(path)
        try:
            info = os.stat(path)
        except OSError:  # a dangling link: listed when named as an image, then unreadable
            if _is_image_file(name):
                self.add_file(os.path.dirname(path), name, label, os.path.realpath(path))
            return
        if not stat.S_ISDIR(info.st_mode):
            if _is_image_file(name) and not self.add_file(
                os.path.dirname(path), name, label, os.path.realpath(path)
            ):
                self.duplicates += 1
                if not self.first_duplicate:
                    self.first_duplicate = (
                        f"{display_path(path)} -> {display_path(os.path.realpath(path))}"
                    )
            return
        key = _identity(info)
        target = display_path(os.path.realpath(path))
        if key in chain or key in self.above:
            self.skipped.append(
                f"skipping folder link {display_path(path)} -> {target}: a loop (the "
                "link sits inside its target)"
            )
        elif key in self.walked:
            self.skipped.append(
                f"skipping folder link {display_path(path)} -> {target}: listed already "
                f"as {display_path(self.walked[key])}"
            )
        else:
            self.walked[key] = path
            self.walk([(path, os.path.realpath(path), label, (*chain, key))])

    def warn(self, root: str) -> None:
        """Log the skipped links and repeated folders, then the file links listed already."""
        for line in self.skipped[:_MAX_WARNINGS]:
            logger.warning("%s", line)
        if len(self.skipped) > _MAX_WARNINGS:
            logger.warning(
                "skipping %d more folder link(s) or repeated folder(s) in %s",
                len(self.skipped) - _MAX_WARNINGS,
                display_path(root),
            )
        if self.duplicates:
            logger.warning(
                "skipping %d file link(s) to image files listed already (first: %s)",
                self.duplicates,
                self.first_duplicate,
            )


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
    listing = _Listing(_folder_and_ancestors(root))
    # Class folders first: what they hold is theirs. Then the links (see follow_links).
    listing.walk(listing.class_folders(root, classes)[::-1])
    listing.follow_links()
    listing.warn(root)
    listing.found.sort()
    return [(os.path.join(folder, name), label) for label, folder, name in listing.found]


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
