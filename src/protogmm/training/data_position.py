"""The data position (where in its epoch the training loader stands) as part of the checkpoint.

torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader` does the work: its
state (batches handed out, the sampler's position, each worker's dataset state) is saved by
Lightning with the fit loop (``checkpoint["loops"]["fit_loop"]["state_dict"]
["combined_loader"]``), and a loader given that state continues with the next batch, skipping
the done ones by index (never loading them). What the library cannot know is ours:

* :class:`ShardSampler`: the order is ``DistributedSampler``'s (a function of seed and epoch,
  this rank's shard, whole shards only); torchdata's ``StatefulDistributedSampler`` counts the
  indices handed out; ours adds the epoch and the epoch's length to that position. With
  workers the loader draws the next indices as soon as it is given a state, before Lightning
  sets the epoch, so the epoch must come from the state; and a position at the end of its
  epoch (Lightning restores one when ``max_steps`` is set) must start the next epoch whole,
  not skip it;
* :class:`WorkerRandomState`: each loader worker's random state (the augmentations' stream)
  as the dataset's torchdata state, so a resumed worker continues its stream where the
  checkpointed batches left it (torchdata restores the worker's dataset state, not its RNG),
  mid-epoch and, handed to the new workers, after an epoch's end;
* :class:`DataPosition`: delivers the saved state (:func:`resume_loader`). Lightning loads a
  stateful loader's state only if it sets the loader up after restoring its loops; asking
  for ``trainer.estimated_stepping_batches`` in ``on_fit_start`` (our module does) sets it
  up before, and the state would be dropped. Under DDP Lightning saves rank 0's state only;
  this callback adds every rank's. A checkpoint of before StatefulDataLoader (``{"epoch",
  "batches", "batches_per_epoch"}``) resumes exactly: same position, and the sampler goes on
  drawing from the global RNG what the old loader drew at each epoch's start.

The loader's own ``generator`` draws its worker base seed, so creating an iterator never
draws from the global RNG (which feeds the augmentations without workers and is
checkpointed): a resumed run creates its iterators at other moments than the uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from protogmm.training.distributed import _world, capture_rng_state, restore_rng_state

#: Every rank's loader state, under DDP (Lightning's ``combined_loader`` holds rank 0's).
RANKS_KEY = "protogmm_loaders"
#: The keys of a data position saved before StatefulDataLoader (``ResumableDataLoader``).
OLD_POSITION_KEYS = frozenset({"epoch", "batches", "batches_per_epoch"})
_SAMPLER_KEYS = frozenset({"yielded", "epoch", "samples_per_epoch"})


class ShardSampler(StatefulDistributedSampler):
    """This rank's shard of a (seed, epoch) permutation, resumable within an epoch.

    ``DistributedSampler(shuffle=True, drop_last=True)``'s order; the state is
    ``{"yielded", "epoch", "samples_per_epoch"}`` (indices handed out in ``epoch``, and the
    indices of the epoch's whole batches of ``batch_size``).
    """

    def __init__(
        self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.samples_per_epoch = self.num_samples // batch_size * batch_size
        #: A run resumed from a checkpoint of before the torchdata loader: that loader drew
        #: its worker seed from the global RNG as each epoch began, so this sampler draws it
        #: too, and the run goes on as the old one would have (same augmentations).
        self.old_rng_draws = False

    def __iter__(self) -> Iterator[int]:
        if self.old_rng_draws and not self.next_yielded:  # not on resuming within an epoch
            torch.empty((), dtype=torch.int64).random_()
        yield from super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "yielded": int(self.yielded),
            "epoch": int(self.epoch),
            "samples_per_epoch": self.samples_per_epoch,
        }
        return state | ({"old_rng_draws": True} if self.old_rng_draws else {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume ``state_dict``'s epoch after its ``yielded`` indices; from a position at
        its epoch's end, the next epoch starts whole."""
        yielded, epoch = int(state_dict["yielded"]), int(state_dict["epoch"])
        self.old_rng_draws = bool(state_dict.get("old_rng_draws", False))
        if yielded >= self.samples_per_epoch:
            self.set_epoch(epoch + 1)
            return
        super().load_state_dict({"yielded": yielded})
        self.set_epoch(epoch)


class WorkerRandomState(Dataset):
    """``dataset``, whose torchdata state in a loader worker is the worker's random state.

    torchdata asks every worker for its dataset's state after each batch and keeps, per
    worker, the state of the last batch handed to the training loop; a worker resumed
    mid-epoch loads it after its seeding, and so draws the augmentations the uninterrupted
    run drew. After an end-of-epoch checkpoint the loader starts afresh (the next epoch's
    batches go to the workers in their first-epoch order, as in the uninterrupted run), and
    :meth:`resume_workers` hands each new worker its stream. In the main process the state
    is empty: its RNG is the checkpoint's own (``protogmm_run``).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._pending: dict[int, Mapping[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if self._pending:
            self._start_stream()
        return self.dataset[index]

    def resume_workers(self, states: Mapping[int, Mapping[str, Any]]) -> None:
        """The random state each worker (by id) starts from, before any worker exists."""
        self._pending = dict(states)

    def _start_stream(self) -> None:
        info = get_worker_info()
        if info is not None:  # this worker's copy: the main process's keeps them for the next
            state, self._pending = self._pending.get(info.id), {}
            if state is not None:
                restore_rng_state(state)

    def state_dict(self) -> dict[str, Any]:
        info = get_worker_info()
        if info is None:
            return {}
        if self._pending:  # a new worker reports its start: the stream it continues
            self._start_stream()
        return {"worker": info.id, **capture_rng_state(cuda=False)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict and get_worker_info() is not None:
            self._pending = {}
            restore_rng_state(state_dict)


def training_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> StatefulDataLoader:
    """The resumable training loader: whole batches of this rank's (seed, epoch) shard.

    Workers persist across epochs (their random streams continue); the base seed of their
    streams comes from the loader's own generator, seeded with ``torch.initial_seed()``
    (the run's seed, per rank), never from the global RNG.
    """
    sampler = ShardSampler(
        dataset, num_replicas=world_size, rank=rank, seed=seed, batch_size=batch_size
    )
    with warnings.catch_warnings():  # torchdata 0.11 on torch 2.14: not news to our users
        warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
        return StatefulDataLoader(
            WorkerRandomState(dataset),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=True,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(torch.initial_seed()),
        )


def resume_loader(loader: StatefulDataLoader, state: Mapping[str, Any]) -> None:
    """Start ``loader`` (of :func:`training_loader`, before its first iterator) at ``state``.

    Mid-epoch, torchdata restores the loader (the next batch, from the worker that made it in
    the uninterrupted run); a position saved before the torchdata loader, or by another
    number of workers, restores the sampler's position only (the same batches: the batch
    size of a mid-epoch resume is checked to be the checkpoint's). At an epoch's end the
    loader starts afresh at the next epoch, its workers continuing their saved streams.
    """
    if OLD_POSITION_KEYS <= set(state):
        done = int(state["batches"]) * int(loader.batch_size or 1)
        position = {"yielded": done, "epoch": int(state["epoch"]), "old_rng_draws": True}
        loader.sampler.load_state_dict(position)
        return
    workers = worker_states(state)
    if is_mid_epoch(state) and len(workers) == loader.num_workers:
        loader.load_state_dict(dict(state))
        return
    if (position := sampler_position(state)) is not None:
        loader.sampler.load_state_dict(position)
    if isinstance(loader.dataset, WorkerRandomState) and not is_mid_epoch(state):
        loader.dataset.resume_workers(workers)


def worker_states(state: Any) -> dict[int, Mapping[str, Any]]:
    """The random state of each worker (by id) inside a loader state."""
    found: dict[int, Mapping[str, Any]] = {}
    if isinstance(state, Mapping):
        if {"worker", "torch", "numpy", "python"} <= set(state):
            return {int(state["worker"]): state}
        for value in state.values():
            found |= worker_states(value)
    return found


def sampler_position(state: Any) -> Mapping[str, Any] | None:
    """The :class:`ShardSampler` state inside a loader state (nested where torchdata keeps it:
    with or without workers)."""
    if isinstance(state, Mapping):
        if _SAMPLER_KEYS <= set(state):
            return state
        for value in state.values():
            if (found := sampler_position(value)) is not None:
                return found
    return None


def is_mid_epoch(state: Mapping[str, Any]) -> bool:
    """Whether a saved loader state (today's or an old position) stands within its epoch."""
    if OLD_POSITION_KEYS <= set(state):
        return 0 < int(state["batches"]) < int(state["batches_per_epoch"])
    sampler = sampler_position(state)
    return sampler is not None and 0 < int(sampler["yielded"]) < int(sampler["samples_per_epoch"])


def loader_states(checkpoint: Mapping[str, Any]) -> list[Any]:
    """The saved training-loader states (Lightning's fit-loop entry: rank 0's)."""
    try:
        states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return []
    return [state for state in states or [] if isinstance(state, Mapping)]


def loader_position(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The first saved training-loader state, if the checkpoint has one."""
    states = loader_states(checkpoint)
    return states[0] if states else None


def _train_loaders(trainer: L.Trainer) -> Iterator[Any]:
    loaders = trainer.train_dataloader
    yield from loaders if isinstance(loaders, (list, tuple)) else [loaders]


class DataPosition(L.Callback):
    """Hands a checkpoint's loader state to the data module on resume (see the module).

    * ``on_save_checkpoint`` (under DDP): adds every rank's loader state under
      :data:`RANKS_KEY` (their workers' random states differ);
    * ``on_load_checkpoint`` (before the loader is set up): gives this rank's state to the
      data module's ``resume_training_loader``, which starts the loader it builds next there
      (:func:`resume_loader`), and takes it out of Lightning's entry: one path restores it,
      whenever Lightning sets the loader up, and Lightning cannot read an old position, a
      state of another number of workers, or start the next epoch from an epoch's end.
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        world_size, _ = _world()
        if world_size > 1:
            mine = [loader.state_dict() for loader in _train_loaders(trainer) if loader is not None]
            states: list[Any] = [None] * world_size
            dist.all_gather_object(states, mine)
            checkpoint[RANKS_KEY] = states

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = loader_states(checkpoint)
        world_size, rank = _world()
        per_rank = checkpoint.get(RANKS_KEY)
        if isinstance(per_rank, list) and len(per_rank) == world_size and per_rank[rank]:
            states = list(per_rank[rank])
        resume = getattr(trainer.datamodule, "resume_training_loader", None)
        if not states or not callable(resume):
            return
        if trainer.train_dataloader is not None:  # not with Lightning's ddp or one device
            if is_mid_epoch(states[0]):
                raise RuntimeError(
                    "protogmm: the training loader was set up before the checkpoint was "
                    "read, so its mid-epoch position cannot be restored; resume from an "
                    "end-of-epoch checkpoint"
                )
            return
        checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = []
        resume(states[0])
