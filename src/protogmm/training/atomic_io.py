"""Atomic checkpoint files: a kill or a power cut during a save never leaves half a checkpoint.

* :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in the target
  folder, flushed and fsync'ed, then renamed over the target (``os.replace``) and the folder
  fsync'ed: a kill or a power cut during a save leaves the previous ``last.ckpt`` whole.
  Reads are ``weights_only=True`` always.
* :func:`read_checkpoint`: the one weights-only reader, with one-line errors naming the file.
* :func:`replace_atomically`: the same write-then-rename for a file another library writes
  (``protogmm export``'s safetensors), with the mode a plain ``open`` would give it;
  :func:`write_text_atomically` for text (the run report, the demo's table).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from protogmm.diagnostics.external import check_checkpoint_path, damaged_checkpoint_message
from protogmm.integrity import check_checkpoint_integrity


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this PID exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial checkpoint at the target path.

    ``save_checkpoint`` serialises straight into ``.<name>.<pid>.tmp`` next to the target
    (no second copy of the checkpoint in memory), fsyncs it, renames it over the target and
    fsyncs the folder. Temporary files of writers that died (their process is gone) are
    removed before the next save of the same target. Remote paths (``s3://`` ...) go to
    Lightning's own fsspec transaction.

    ``load_checkpoint`` always reads with ``weights_only=True``: protogmm checkpoints hold only
    tensors and plain containers, and nothing pickled is ever executed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries(target)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                self.write(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as error:  # e.g. a full disk: named by the checkpoint, not the temporary
            temporary.unlink(missing_ok=True)
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(target)) from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file (tests override this)."""
        torch.save(checkpoint, handle)

    @staticmethod
    def _remove_stale_temporaries(target: Path) -> None:
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.tmp$")
        for candidate in target.parent.glob(f".{target.name}.*.tmp"):
            match = pattern.match(candidate.name)
            if match and not process_alive(int(match.group(1))):
                candidate.unlink(missing_ok=True)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location)


def read_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Args:
        path: a checkpoint file.
        map_location: as for :func:`torch.load`.
        mmap: map the tensors instead of reading them (for looking at the metadata only).

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory.
        ValueError: not a weights-only checkpoint (corrupt, truncated or foreign), or its
            bytes fail the archive's own CRC-32 checks (:mod:`protogmm.integrity`). A
            truncated file says so, in the words ``protogmm diagnose`` uses.
    """
    local = "://" not in str(path)
    if local:
        check_checkpoint_path(path)  # absent or a directory: diagnose's words
        check_checkpoint_integrity(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 (any unpickling failure: one line naming the file)
        damaged = damaged_checkpoint_message(path) if local else None
        if damaged is not None:
            raise ValueError(damaged) from None
        raise ValueError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a training checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write`` write a temporary file beside ``path``, then rename it over ``path``.

    A kill during the write leaves the previous file (or none), never half a file. The file
    gets the mode a plain ``open`` gives (0666 less the umask, as checkpoints and reports
    get): writers that create their file as 0600 (safetensors' ``save_file``, like
    ``tempfile.mkstemp``) would otherwise leave an export only its owner can read.

    Args:
        path: the file to write.
        write: writes the whole file at the path it is given (the temporary one).

    Returns:
        ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # Created here first, so its mode is the umask's; a writer that replaces the file
        # (rather than writing into it) gets that mode back below.
        with open(temporary, "wb"):
            pass
        mode = temporary.stat().st_mode & 0o777
        write(temporary)
        os.chmod(temporary, mode)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: never half a file.

    UTF-8, with any lone surrogate (a file name that is not UTF-8) written as a ``\\udcff``
    escape rather than failing; the temporary file is removed if anything fails.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
