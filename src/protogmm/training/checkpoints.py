"""Rebuild a trained PrototypicalSSL from one of protogmm's checkpoints (weights only)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from protogmm.training.legacy_hparams import checkpoint_model_hparams
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
        ValueError: the file is not a protogmm training checkpoint, is corrupt, or its
            weights do not match its hyperparameters (one line naming the file).
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
    # Either layout: the flat one before the host classes is rewritten into today's, with
    # the defaults of the version that wrote it.
    saved = checkpoint_model_hparams(checkpoint["hyper_parameters"])
    hparams = {k: v for k, v in saved.items() if k in accepted}
    # A dry run on the meta device (no memory): hyperparameters that disagree with the saved
    # weights (e.g. a K of 10**12, or a state dict without the mixture's tensors) are one
    # line naming the file, before anything of that size is allocated.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op"
        _load_state(PrototypicalSSL(**hparams), checkpoint["state_dict"], path)
    torch.manual_seed(0)
    module = PrototypicalSSL(**hparams)
    if trained:
        _load_state(module, checkpoint["state_dict"], path)
    return module.eval()


def _load_state(module: PrototypicalSSL, state_dict: dict, path: str | Path) -> None:
    """``load_state_dict(strict=True)``, its multi-line error folded into one line."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as error:
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else " ".join(str(error).split())
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"{path}: its weights do not match its own hyperparameters: {first[:300]}{more}"
        ) from None
