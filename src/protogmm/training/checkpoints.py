"""Rebuild a trained PrototypicalSSL from one of protogmm's checkpoints (weights only)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import read_checkpoint


def load_module(path: str | Path, *, trained: bool = True) -> PrototypicalSSL:
    """The module a ``protogmm fit`` checkpoint describes, in eval mode, on CPU.

    Read with ``torch.load(weights_only=True)``; the module is rebuilt from the stored
    hyperparameters, so no pickled code is ever executed.

    Args:
        path: a ``.ckpt`` written by ``protogmm fit`` or ``protogmm demo``.
        trained: False returns the same architecture at its seed-0 initialisation (the
            untrained-encoder baseline), without loading the weights.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a protogmm training checkpoint.
    """
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        raise ValueError(
            f"{path}: not a protogmm training checkpoint (no state_dict/hyper_parameters); "
            "`protogmm diagnose` reads other projects' prototype heads"
        )
    accepted = set(inspect.signature(PrototypicalSSL.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    torch.manual_seed(0)
    module = PrototypicalSSL(**hparams)
    if trained:
        module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
