"""What the evaluation commands need to run under torchrun: join, know rank 0, leave."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def join_torchrun() -> torch.device:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (NCCL on GPUs, gloo on
    CPUs) and return this process's device; else the first GPU or the CPU."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def is_rank_zero() -> bool:
    """Whether this process prints and writes (always, without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def leave() -> int:
    """Leave the process group, if any; 0 (the command's exit status)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
