"""Crash safety and exact resume: what protogmm adds to Lightning's checkpointing.

* :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in the target
  folder, flushed and fsync'ed, then renamed over the target (``os.replace``) and the folder
  fsync'ed: a kill or a power cut during a save leaves the previous ``last.ckpt`` whole.
  Reads are ``weights_only=True`` always.
* :func:`training_loader`: a torchdata ``StatefulDataLoader`` whose state (the data
  position: batches handed out, each worker's random state) Lightning saves with its loops,
  so a run resumed from a mid-epoch checkpoint sees exactly the batches (and augmentations)
  the uninterrupted run would have seen next; :class:`ShardSampler` orders by (seed, epoch)
  and :class:`DataPosition` hands the saved state over on resume.
* :class:`NonFiniteGuard`: a non-finite input batch, teacher embedding, loss or mixture
  statistic stops the run before the optimizer step (so nothing non-finite is ever saved),
  with a message naming what and at which step; or, with ``action="skip"``, the step is
  skipped and counted.
* :func:`check_resume_compatible`: a checkpoint from another configuration (K, d, host,
  prototype kind, ...) or another process layout is a one-line error before any step.

Each lives in its own module (:mod:`~protogmm.training.atomic_io`,
:mod:`~protogmm.training.data_position`, :mod:`~protogmm.training.nonfinite_guard`,
:mod:`~protogmm.training.resume_check`); this module gathers them under the name the
runner, the CLI and the tests have always imported them by.
"""

from protogmm.training.atomic_io import AtomicCheckpointIO, process_alive, read_checkpoint
from protogmm.training.data_position import (
    DataPosition,
    ShardSampler,
    WorkerRandomState,
    training_loader,
)
from protogmm.training.nonfinite_guard import NonFiniteAction, NonFiniteError, NonFiniteGuard
from protogmm.training.resume_check import STRUCTURAL_KEYS, check_resume_compatible

__all__ = [
    "STRUCTURAL_KEYS",
    "AtomicCheckpointIO",
    "DataPosition",
    "NonFiniteAction",
    "NonFiniteError",
    "NonFiniteGuard",
    "ShardSampler",
    "WorkerRandomState",
    "check_resume_compatible",
    "process_alive",
    "read_checkpoint",
    "training_loader",
]
