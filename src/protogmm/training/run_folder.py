"""The run folder: never silently replaced, never written by two runs at once.

A fit writes into one folder (``trainer.default_root_dir``): ``config.yaml``, ``metrics.csv``,
``checkpoints/``, ``summary.json``, ``report.md``. Before the first step:

* :func:`claim_run_folder` creates it, or says in one line why it cannot be written (under
  a file, read-only, no space); locks it for this process (:class:`RunFolderLock`:
  ``.protogmm.lock``, created exclusively, holding the owner's host and PID: a second fit
  into the same folder is one line naming the owner; the lock of a process that died, e.g.
  by kill -9, is taken over); and refuses a folder that holds another run unless the new
  run resumes that run's own checkpoint or ``overwrite`` is asked (then the old run's files
  are removed first, so the folder never mixes two runs).
* :func:`resolve_checkpoint` turns ``--ckpt_path last|best`` into the file in the folder,
  so the resume checks run on it like on any other path.

The refusals name the options of the command that claims the folder (:class:`FolderOptions`:
``fit``'s by default, ``demo`` has its own).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from protogmm.training.reliability import process_alive
from protogmm.training.run_logger import TENSORBOARD_EVENTS

__all__ = [
    "FIT_OPTIONS",
    "RUN_FILES",
    "FolderOptions",
    "RunFolderLock",
    "claim_run_folder",
    "holds_a_run",
    "resolve_checkpoint",
]

#: What a run writes into its folder (the files ``overwrite`` removes; glob patterns).
RUN_FILES = (
    "checkpoints",
    "metrics.csv",
    TENSORBOARD_EVENTS,
    "config.yaml",
    "hparams.yaml",
    "summary.json",
    "report.md",
    "collapse_over_training.png",
)
LOCK_NAME = ".protogmm.lock"
#: An unreadable lock younger than this is being written by its owner, not stale.
_HALF_WRITTEN_SECONDS = 10.0
_BEST = re.compile(r"^best-knn-epoch=(\d+)-top1=([0-9.]+)\.ckpt$")


@dataclass(frozen=True)
class FolderOptions:
    """The options of the command claiming a run folder, as its refusals name them.

    Attributes:
        elsewhere: the option that writes the run into another folder.
        overwrite: the option (with its value, if it takes one) that replaces the run the
            folder holds.
        resume: the option that resumes a run from a checkpoint, or None where the command
            cannot resume.
    """

    elsewhere: str = "--trainer.default_root_dir"
    overwrite: str = "--overwrite true"
    resume: str | None = "--ckpt_path"


#: ``protogmm fit``'s options.
FIT_OPTIONS = FolderOptions()


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds the results of a run (a checkpoint, metrics or a summary)."""
    checkpoints = folder / "checkpoints"
    return (
        (folder / "metrics.csv").is_file()
        or (folder / "summary.json").is_file()
        or any(folder.glob(TENSORBOARD_EVENTS))
        or (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))
    )


def _writable_folder(folder: Path) -> None:
    """Create ``folder`` and prove it writable, or raise one line naming it and why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".protogmm-probe.{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)  # a full disk refuses a block, not an empty file
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        reason = {
            errno.ENOTDIR: "a part of the path is a file",
            errno.EEXIST: "it exists as a file",
            errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
        }.get(error.errno or 0, error.strerror or type(error).__name__)
        raise ValueError(f"run folder {folder}: cannot be written ({reason})") from None
    if not folder.is_dir():
        raise ValueError(f"run folder {folder}: cannot be written (it exists as a file)")


def claim_run_folder(
    folder: str | os.PathLike[str],
    ckpt_path: str | None,
    overwrite: bool,
    options: FolderOptions = FIT_OPTIONS,
) -> RunFolderLock:
    """Make ``folder`` ready for a fit and claim it, before any file of the run is written.

    In this order: the folder is created and proved writable; it is locked
    (:class:`RunFolderLock`), so that no other run is between the check and the writes; a
    run it holds is refused, unless the fit resumes a checkpoint of that folder or asks to
    ``overwrite`` it (then that run's files, :data:`RUN_FILES`, are removed now).

    Args:
        folder: the run folder (``trainer.default_root_dir``).
        ckpt_path: the checkpoint the run resumes from (a resolved path), or None.
        overwrite: replace a run the folder holds.
        options: the command's options that the refusals name.

    Returns:
        The held lock: release it when the fit ends.

    Raises:
        ValueError: one line: the folder cannot be written, another run holds it, or it
            holds another run and the fit neither resumes it nor asks to overwrite it.
    """
    folder = Path(folder)
    _writable_folder(folder)
    lock = RunFolderLock(folder, options)
    lock.acquire()
    try:
        _replace_or_refuse(folder, ckpt_path, overwrite, options)
    except BaseException:
        lock.release()
        raise
    return lock


def _replace_or_refuse(
    folder: Path, ckpt_path: str | None, overwrite: bool, options: FolderOptions
) -> None:
    if not holds_a_run(folder):
        return
    if ckpt_path is not None and _inside(Path(ckpt_path), folder):
        return  # resuming this folder's own run: it goes on in place
    if not overwrite:
        resume = ""
        if options.resume is not None:
            resume = f"resume it ({options.resume} {folder / 'checkpoints' / 'last.ckpt'}), "
        raise ValueError(
            f"run folder {folder} holds a run already: {resume}write elsewhere "
            f"({options.elsewhere}){',' if resume else ''} or replace it ({options.overwrite})"
        )
    for target in (path for name in RUN_FILES for path in folder.glob(name)):
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def resolve_checkpoint(ckpt_path: str | None, folder: str | os.PathLike[str]) -> str | None:
    """``--ckpt_path``, with ``last`` and ``best`` resolved to files of the run ``folder``.

    ``last``: ``checkpoints/last.ckpt``; ``best``: the ``best-knn-*`` checkpoint with the
    highest k-NN top-1 in its name (ties: the later epoch). Any other value is returned as
    given (a path, or Lightning's ``hpc`` / ``registry``).

    Raises:
        FileNotFoundError: one line: the folder has no such checkpoint.
    """
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    checkpoints = Path(folder) / "checkpoints"
    if ckpt_path == "last":
        last = checkpoints / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint {last} to resume from")
        return str(last)
    ranked = []
    for candidate in checkpoints.glob("best-knn-*.ckpt") if checkpoints.is_dir() else []:
        match = _BEST.match(candidate.name)
        if match:
            ranked.append((float(match.group(2).rstrip(".")), int(match.group(1)), candidate))
    if not ranked:
        raise FileNotFoundError(f"--ckpt_path best: no best-knn-*.ckpt in {checkpoints}")
    return str(max(ranked)[2])


class RunFolderLock:
    """Exclusive claim of a run folder by one process (a context manager).

    The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file
    systems) and holds ``host pid``. A lock whose process is gone (same host, PID not
    alive) is stale and taken over, so a kill -9 never blocks the resume.

    Args:
        folder: the run folder (must exist).
        options: the claiming command's options, named when the folder is in use.
    """

    def __init__(
        self, folder: str | os.PathLike[str], options: FolderOptions = FIT_OPTIONS
    ) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._elsewhere = options.elsewhere
        self._held = False

    def acquire(self) -> None:
        """Claim the folder, or raise one line naming the process that holds it."""
        owner = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):  # a second try after removing a stale lock
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._live_holder()
                if holder is not None:
                    raise ValueError(
                        f"run folder {self.path.parent} is in use by another protogmm run "
                        f"({holder}); wait for it, write elsewhere ({self._elsewhere}), "
                        f"or remove {self.path} if that process is not protogmm"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(owner + "\n")
            self._held = True
            return
        raise ValueError(f"run folder {self.path.parent}: cannot claim {self.path.name}")

    def release(self) -> None:
        """Give the folder back (removes the lock file if this process holds it)."""
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def _live_holder(self) -> str | None:
        """``"host H, pid P"`` of the process holding the lock, or None if it is stale."""
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            # Unreadable: being written by its owner right now, or left half-written.
            young = _age_seconds(self.path) < _HALF_WRITTEN_SECONDS
            return "a process writing its lock" if young else None
        if host == socket.gethostname() and not (pid.isdigit() and process_alive(int(pid))):
            return None  # its process is gone (kill -9): stale
        return f"host {host}, pid {pid}"  # alive, or on another host (trusted)

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")
