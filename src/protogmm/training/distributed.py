"""Multi-process training: what protogmm adds to Lightning's DDP strategy.

Lightning's ``ddp`` strategy is the engine (process groups, gradient all-reduce, torchrun and
its own launcher, multi-node). Three things are ours, because only we know the method:

* the online GMM and DINO's centre are kept identical on every rank by their own
  all-reduces (``prototypes/gmm.py``, ``objectives/dino.py``), so DDP must not also broadcast
  them from rank 0 before every forward (at K = 65536, d = 256 that would be ~270 MB per
  step, twice the statistics' own all-reduce): :func:`synchronised_buffer_names`;
* each rank draws its own augmentations (the data order is split by the sampler, but the
  crops come from the process's global RNG, which ``seed_everything`` makes equal on every
  rank), and a checkpoint carries every rank's RNG state so a resumed DDP run continues
  every rank's stream: :class:`DistributedRun`;
* before each checkpoint, the ranks compare an exact fingerprint of the synchronised
  state, so a mixture that diverged across ranks stops the run instead of being saved.

It also holds the launch-consistency check of ``protogmm fit`` under ``torchrun``
(:func:`check_launch`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from protogmm.objectives import CARPLoss, DINOLoss, IBOTPatchLoss
from protogmm.prototypes import OnlineGMM

#: Modules whose buffers are kept equal on every rank by their own code under DDP: the
#: mixture and the centres are all-reduced (the mixture's seeding broadcast), CARP's
#: partition counter advances once per step everywhere.
SYNCHRONISED_MODULES: tuple[type[nn.Module], ...] = (OnlineGMM, DINOLoss, IBOTPatchLoss, CARPLoss)

#: Key of the run-level state protogmm adds to every checkpoint.
CHECKPOINT_KEY = "protogmm_run"


def synchronised_buffer_names(module: nn.Module) -> list[str]:
    """Names of the buffers of ``module`` that our own collectives keep equal on every rank."""
    names = []
    for prefix, child in module.named_modules():
        if isinstance(child, SYNCHRONISED_MODULES):
            # Non-persistent buffers (OnlineGMM.moved, a per-step mark) are not state.
            transient = child._non_persistent_buffers_set
            names += [
                f"{prefix}.{name}" if prefix else name
                for name, _ in child.named_buffers(recurse=False)
                if name not in transient
            ]
    return names


def synchronised_state(module: nn.Module) -> dict[str, Tensor]:
    """What must be bit-identical on every rank after every step.

    The student's and teacher's parameters (DDP all-reduces the gradients; the EMA is
    deterministic) and the synchronised buffers (GMM, centre). BatchNorm running statistics
    are not in it: each rank updates them from its own shard (DDP broadcasts rank 0's before
    every forward), as in any DDP run without SyncBatchNorm.
    """
    state = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    state.update({name: buffers[name] for name in synchronised_buffer_names(module)})
    return state


def _fingerprint(tensor: Tensor) -> int:
    """An exact integer digest of a tensor's bits (two tensors that differ in one bit differ)."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        flat = flat.contiguous().view(bits)
    total, chunk = 0, 1 << 22  # chunks bound the int64 copies of a large GMM buffer
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].long()
        position = torch.arange(start + 1, start + 1 + part.numel(), device=part.device)
        # Position-weighted (a permutation also differs); int64 wrap-around is harmless.
        total += int((part * position).sum())
    return total


def capture_rng_state(cuda: bool = True) -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states as tensors and plain values.

    ``PrototypicalSSL.on_save_checkpoint`` stores it; tensors and plain values only, so it
    loads with ``torch.load(weights_only=True)``. ``cuda=False`` leaves CUDA out (a data
    loader worker must not touch it).
    """
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else [],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_rank(base_seed: int, rank: int) -> None:
    """Seed torch, numpy and python for ``rank`` (distinct, deterministic streams)."""
    seed = (base_seed + 1_000_003 * rank) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class DistributedRun(L.Callback):
    """Makes a DDP run of :class:`~protogmm.training.module.PrototypicalSSL` exact and checked.

    * ``setup``: tells DDP not to broadcast the buffers our collectives synchronise; seeds
      ranks > 0 with their own augmentation stream (rank 0 keeps the single-process stream,
      so a one-process run is unchanged);
    * ``on_save_checkpoint``: compares an exact fingerprint of :func:`synchronised_state`
      across ranks (raising if the ranks diverged) and stores every rank's RNG state and the
      world size under ``checkpoint["protogmm_run"]``;
    * ``on_load_checkpoint``: each rank restores its own RNG state (after the module restored
      rank 0's), so every rank continues its own random stream.

    Single-process runs only record the world size (1) and their RNG state.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size <= 1:
            return
        # Read by torch's DistributedDataParallel when the strategy wraps the module (after
        # the setup hooks): these buffers are neither broadcast nor checked by DDP.
        pl_module._ddp_params_and_buffers_to_ignore = synchronised_buffer_names(pl_module)
        if trainer.global_rank > 0:
            seed_rank(
                int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())), trainer.global_rank
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        batch = getattr(getattr(datamodule, "hparams", None), "batch_size", None)
        if trainer.world_size > 1 and batch is not None:
            rank_zero_info(
                f"protogmm: {trainer.world_size} processes x {batch} images = global batch "
                f"{trainer.world_size * batch} (model.lr is used as given: see README, "
                "'Multi-GPU and multi-node')"
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        world_size, _ = _world()
        rng = capture_rng_state()
        if world_size > 1:
            self._check_ranks_agree(trainer, pl_module)
            states: list[Any] = [None] * world_size
            dist.all_gather_object(states, rng)  # every rank saves via dump_checkpoint
        else:
            states = [rng]
        checkpoint[CHECKPOINT_KEY] = {"world_size": world_size, "rng": states}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        run = checkpoint.get(CHECKPOINT_KEY)
        world_size, rank = _world()
        if run is None or world_size == 1:
            return  # one process: the module restored the (only) RNG state already
        states = run["rng"]
        if len(states) == world_size:
            restore_rng_state(states[rank])
            return
        # Another world size: there is no stream to continue; give every rank a distinct one.
        seed_rank(int(os.environ.get("PL_GLOBAL_SEED", 0)) + int(checkpoint["global_step"]), rank)
        rank_zero_warn(
            f"protogmm: the checkpoint was written by {len(states)} processes and this run has "
            f"{world_size}; training continues but does not reproduce an uninterrupted run"
        )

    @staticmethod
    def _check_ranks_agree(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise if any synchronised tensor differs in any bit between ranks."""
        names, digests = [], []
        for name, tensor in synchronised_state(pl_module).items():
            names.append(name)
            digests.append(_fingerprint(tensor))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, digests)
        for other_rank, other in enumerate(gathered[1:], start=1):
            for name, mine, theirs in zip(names, gathered[0], other, strict=True):
                if mine != theirs:
                    raise RuntimeError(
                        f"step {trainer.global_step}: {name} differs between rank 0 and rank "
                        f"{other_rank}: the ranks diverged, the checkpoint was not written"
                    )


# ---------------------------------------------------------------------- launch checks
def torchrun_layout(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(world_size, processes_per_node)`` when launched by torchrun, else None.

    torchrun (torch.distributed.run) sets ``GROUP_RANK`` and ``LOCAL_WORLD_SIZE`` besides
    ``RANK``/``WORLD_SIZE``; Lightning's own launcher does not, so its children are not
    mistaken for a torchrun launch.
    """
    env = os.environ if env is None else env
    if not {"RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"} <= set(env):
        return None
    return int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])


def check_launch(
    devices: Any,
    num_nodes: int,
    accelerator: Any,
    env: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
) -> Any:
    """Check the trainer's process layout against the launcher and the machine.

    Under torchrun, ``trainer.devices`` must equal ``--nproc_per_node`` and
    ``devices x num_nodes`` the world size; ``devices: auto`` takes torchrun's value. On GPU,
    ``devices`` may not exceed the GPUs present.

    Args:
        devices: the ``trainer.devices`` setting (int, ``"auto"``, a list or a string).
        num_nodes: ``trainer.num_nodes``.
        accelerator: ``trainer.accelerator``.
        env: environment variables (default ``os.environ``).
        cuda_devices: GPUs present (default ``torch.cuda.device_count()``).

    Returns:
        The ``devices`` value to use (torchrun's per-node count in place of ``"auto"``).

    Raises:
        ValueError: one line naming the inconsistent settings.
    """
    layout = torchrun_layout(env)
    if layout is not None:
        world_size, per_node = layout
        if devices in ("auto", None):
            devices = per_node
        count = _device_count(devices)
        if count is not None and count != per_node:
            raise ValueError(
                f"trainer.devices={devices} but torchrun started {per_node} processes per node "
                f"(--nproc_per_node); pass --trainer.devices {per_node}"
            )
        if per_node * num_nodes != world_size:
            raise ValueError(
                f"trainer.num_nodes={num_nodes} x {per_node} processes per node = "
                f"{per_node * num_nodes}, but torchrun's world size is {world_size}; pass "
                f"--trainer.num_nodes {world_size // max(per_node, 1)}"
            )
    if str(accelerator).lower() in ("gpu", "cuda"):
        present = torch.cuda.device_count() if cuda_devices is None else cuda_devices
        count = _device_count(devices)
        if count is not None and count > present:
            raise ValueError(
                f"trainer.devices={devices} but this machine has {present} CUDA device(s)"
            )
    return devices


def _device_count(devices: Any) -> int | None:
    """Processes per node a ``trainer.devices`` value asks for (None: decided by Lightning)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices >= 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            return int(text) if int(text) >= 0 else None
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
    return None
