"""Checkpoint integrity: a file whose bytes changed since it was written is refused.

``torch.save`` writes a zip archive and stores a CRC-32 of every record, but ``torch.load``
does not check them (its memory-mapped and direct readers go straight to the records'
offsets), so a checkpoint with flipped bytes on disk loads and resumes with garbage weights.
:func:`check_checkpoint_integrity` reads every record once and compares its CRC-32, in
Python's :mod:`zipfile` (no third-party code, nothing unpickled). Every checkpoint protogmm
reads (resume, ``eval``, ``diagnose``, ``export``) goes through it first.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

__all__ = ["CorruptCheckpointError", "check_checkpoint_integrity"]

#: Files found intact in this process, by (resolved path, size, modification time).
_VERIFIED: set[tuple[str, int, int]] = set()


class CorruptCheckpointError(ValueError):
    """A checkpoint whose stored checksums do not match its bytes (one line naming it)."""


def check_checkpoint_integrity(path: str | os.PathLike[str]) -> None:
    """Raise if the zip checkpoint at ``path`` fails its own CRC-32 checks.

    Files that are not zip archives (PyTorch's legacy format, before 1.6) carry no checksum
    and pass; so do archives written with ``torch.serialization.set_crc32_options(False)``
    (every stored CRC is 0: nothing to compare against).

    Args:
        path: a local checkpoint file.

    Raises:
        CorruptCheckpointError: the archive's directory is unreadable, or a record's bytes
            do not match its stored CRC-32 (the message names the file and the record).
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return  # read once already (a resume checks the file, then Lightning loads it)
    if zipfile.is_zipfile(path):
        _check_records(path)
    _VERIFIED.add(key)


def _check_records(path: Path) -> None:
    """Every record's CRC-32 against its bytes (raises :class:`CorruptCheckpointError`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if records and all(record.CRC == 0 for record in records):
                return  # written without checksums
            bad_record = archive.testzip()  # reads every record, compares its CRC-32
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as error:
        raise CorruptCheckpointError(
            f"{path}: corrupt checkpoint (its zip structure is unreadable: {error})"
        ) from None
    if bad_record is not None:
        raise CorruptCheckpointError(
            f"{path}: corrupt checkpoint (record {bad_record!r} fails its CRC-32 check: "
            "the file changed after it was written)"
        )
