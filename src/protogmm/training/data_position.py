"""The data position (epoch, batches consumed) as part of the checkpoint: exact mid-epoch resume.

:class:`ResumableDataLoader` and :class:`ResumableDistributedSampler` save their position
through Lightning's stateful-loader protocol, so a run resumed from a mid-epoch checkpoint sees
exactly the batches the uninterrupted run would have seen next; :class:`DataPosition` hands
the saved position over when Lightning set the loader up too early to do it itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can resume an epoch after its first ``n`` indices.

    The order is the parent's: a function of (seed, epoch, rank, world size) only. ``len``
    stays the full epoch's, which is what Lightning's loop counts a resumed epoch against.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Indices to leave out at the start of the next iteration (a resumed epoch).
        self.skip_indices = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip_indices = self.skip_indices, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader whose position (epoch, batches handed to the training loop) is checkpointed.

    Lightning saves ``state_dict()`` with the fit loop; on resume the position comes back
    through ``load_state_dict()`` (from Lightning, or from :class:`DataPosition` when
    Lightning set the loader up before restoring its loops). The next iteration of the saved
    epoch then skips the batches already trained on (by index, without loading them); an
    end-of-epoch position just lets the next epoch start. Only batches handed out are
    counted, so worker prefetching does not shift the position.

    The underlying iterator is created at the first ``next()``, when Lightning has set the
    sampler's epoch and delivered the position (it calls ``iter()`` earlier). Creating it
    draws a worker base seed from the global RNG; the uninterrupted run drew it at the start
    of the epoch, so a mid-epoch resume puts the RNG back after the draw.

    Requires a :class:`ResumableDistributedSampler` as ``sampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableDistributedSampler):
            raise ValueError(
                "ResumableDataLoader needs a ResumableDistributedSampler, got "
                f"{type(self.sampler).__name__}"
            )
        self.position = {"epoch": 0, "batches": 0}
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "batches_per_epoch"}`` of the training loop's position."""
        return {**self.position, "batches_per_epoch": len(self)}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def _start_epoch(self) -> Iterator[Any]:
        """The real iterator of the current epoch, resumed at the saved position if any."""
        epoch, skip = int(getattr(self.sampler, "epoch", 0)), 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            skip = min(self._resume_at[1], len(self))
        self._resume_at = None
        self.position = {"epoch": epoch, "batches": skip}
        if skip == 0:
            return DataLoader.__iter__(self)
        self.sampler.skip_indices = skip * self.batch_size
        rng = torch.get_rng_state()
        iterator = DataLoader.__iter__(self)
        torch.set_rng_state(rng)
        return iterator


class _CountingIterator(Iterator[Any]):
    """Creates the loader's iterator at the first ``next()`` and counts the batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start_epoch()
        batch = next(self.iterator)
        self.loader.position["batches"] += 1
        return batch


class DataPosition(L.Callback):
    """Delivers a checkpoint's data position to :class:`ResumableDataLoader` on resume.

    Lightning loads a stateful loader's state only if it sets the loader up after restoring
    its loops; anything that asks for ``trainer.estimated_stepping_batches`` in
    ``on_fit_start`` (our module does, for the annealing) makes it set the loader up before,
    and the position would be lost. This callback keeps the saved position and hands it to
    the loader at ``on_train_start``, before the first batch is drawn.
    """

    def __init__(self) -> None:
        self._saved: list[dict[str, int]] = []

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved = list(loader_states(checkpoint))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self._saved = self._saved, []
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        resumable = [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]
        for loader, state in zip(resumable, saved, strict=False):
            loader.load_state_dict(state)


def loader_states(checkpoint: Mapping[str, Any]) -> list[dict[str, int]]:
    """The saved :class:`ResumableDataLoader` states (Lightning's fit-loop entry)."""
    try:
        states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return []
    keys = {"epoch", "batches", "batches_per_epoch"}
    return [
        {key: int(value) for key, value in state.items()}
        for state in states or []
        if isinstance(state, Mapping) and keys <= set(state)
    ]


def loader_position(checkpoint: Mapping[str, Any]) -> dict[str, int] | None:
    """The first saved :class:`ResumableDataLoader` state, if the checkpoint has one."""
    states = loader_states(checkpoint)
    return states[0] if states else None
