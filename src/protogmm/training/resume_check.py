"""Resume compatibility: a checkpoint that cannot continue this run is a one-line error.

:func:`check_resume_compatible` compares a checkpoint with the run about to resume from it,
before any step: another configuration (K, d, host, prototype kind, ...), another optimizer
layout or, mid-epoch, another process layout is refused; settings that may differ are
returned as notes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

from protogmm.hosts import Host
from protogmm.prototypes.kinds import PrototypeKind
from protogmm.training.atomic_io import read_checkpoint
from protogmm.training.data_position import is_mid_epoch, loader_position
from protogmm.training.data_settings import DATA_GROUPS, plain_group
from protogmm.training.distributed import CHECKPOINT_KEY
from protogmm.training.legacy_hparams import (
    checkpoint_model_hparams,
    upgrade_data_hparams,
    upgrade_model_hparams,
)

#: Model settings that define the checkpoint's state layout or the method itself. A resumed
#: run must have the checkpoint's values (compared when both sides have the key). The host
#: and the prototype kind are compared as their class (``host``) and each option
#: (``host.<option>``), every option with its value, defaults included.
STRUCTURAL_KEYS = (
    "host",
    "prototypes",
    "num_prototypes",
    "bottleneck_dim",
    "hidden_dim",
    "head_layers",
    "head_bn",
    "backbone",
    "backbone_kwargs",
    "in_channels",
    "image_size",
    "prototypes.targets",
    "prototypes.gmm",
    "host.patch_prototypes",
    "host.num_patch_prototypes",
    "optimizer",  # its saved state (moments, momentum buffers) loads only into its own kind
)


def comparable_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Model settings of either layout (today's, or the flat one before the classes) as one
    flat mapping: ``host`` and ``prototypes`` become their class names, and each of their
    options a key of its own (``host.patch_weight``), defaults included. Data settings
    among them (``hparams.yaml`` holds both) are made comparable too
    (:func:`comparable_data_settings`)."""
    settings = upgrade_model_hparams(comparable_data_settings(hparams))
    with warnings.catch_warnings():  # e.g. posterior targets without balancing: not news here
        warnings.simplefilter("ignore")
        for key, base, default in (
            ("host", Host, "dino"),
            ("prototypes", PrototypeKind, "decoupled"),
        ):
            chosen = base.build(settings.get(key) or default, f"model.{key}")
            settings[key] = type(chosen).__name__
            for option, value in chosen.init_args().items():
                settings[f"{key}.{option}"] = chosen.spec_value(option, value)
    return settings


def comparable_data_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Data-module settings of either layout (today's groups, or the flat keys before them)
    as one flat mapping: each group's option a key of its own (``synthetic.samples``), so a
    checkpoint of the flat layout (``synthetic_samples``) compares equal to today's."""
    settings = upgrade_data_hparams(hparams)
    for group in DATA_GROUPS:
        value = settings.get(group)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = plain_group(value)
        if isinstance(value, Mapping):
            del settings[group]
            settings.update({f"{group}.{option}": item for option, item in value.items()})
    return settings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=0, abs_tol=0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        a, b = dict(a or {}), dict(b or {})  # None and {} both mean "defaults"
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_resume_compatible(
    path: str | os.PathLike,
    model_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None,
    world_size: int,
) -> list[str]:
    """Check a checkpoint against the run about to resume from it, before any step.

    Args:
        path: the checkpoint (``--ckpt_path``).
        model_hparams: the new run's model hyperparameters.
        data_hparams: the new run's data-module hyperparameters (None: not checked).
        world_size: processes of the new run (devices x nodes).

    Returns:
        Notes on settings that differ but may (the run then is not an exact continuation),
        one line each.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the first mismatch: a structural model setting (see
            :data:`STRUCTURAL_KEYS`), or a mid-epoch checkpoint resumed with another process
            layout or per-device batch (its data position would be meaningless).
    """
    checkpoint = read_checkpoint(path, mmap=True)
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, Mapping):
        raise ValueError(f"{path}: not a protogmm training checkpoint (no hyper_parameters)")
    saved = comparable_settings(checkpoint_model_hparams(saved))
    model_hparams = comparable_settings(model_hparams)
    for key in STRUCTURAL_KEYS:
        if key in saved and key in model_hparams and not _same(saved[key], model_hparams[key]):
            raise ValueError(
                f"--ckpt_path {path}: model.{key} is {saved[key]!r} in the checkpoint but "
                f"{model_hparams[key]!r} in this run"
            )
    _check_optimizer_layout(path, saved, model_hparams)
    notes = [
        f"model.{key}: {saved[key]!r} -> {model_hparams[key]!r}"
        for key in sorted(set(saved) & set(model_hparams))
        if key not in STRUCTURAL_KEYS and not _same(saved[key], model_hparams[key])
    ]
    saved_data = comparable_data_settings(checkpoint.get("datamodule_hyper_parameters") or {})
    if data_hparams is not None:
        data_hparams = comparable_data_settings(data_hparams)
        notes += [
            f"data.{key}: {saved_data[key]!r} -> {data_hparams[key]!r}"
            for key in sorted(set(saved_data) & set(data_hparams))
            if not _same(saved_data[key], data_hparams[key])
        ]
    saved_world = int((checkpoint.get(CHECKPOINT_KEY) or {}).get("world_size", 1))
    position = loader_position(checkpoint)  # torchdata's state, or a position of before it
    if position is not None and is_mid_epoch(position):
        saved_batch = saved_data.get("batch_size")
        batch = (data_hparams or {}).get("batch_size", saved_batch)
        if saved_world != world_size or saved_batch != batch:
            raise ValueError(
                f"--ckpt_path {path}: written mid-epoch by {saved_world} process(es) x "
                f"{saved_batch} images, resumed with {world_size} x {batch}: resume with the "
                "same layout or from an end-of-epoch checkpoint"
            )
    elif saved_world != world_size:
        notes.append(f"processes: {saved_world} -> {world_size}")
    return notes


def _check_optimizer_layout(
    path: str | os.PathLike, saved: Mapping[str, Any], model_hparams: Mapping[str, Any]
) -> None:
    """Raise if the saved optimizer state cannot load into this run's optimizer groups.

    A joint ``lr_multiplier != 1`` gives learned prototypes a third group
    (:meth:`PrototypicalSSL.configure_optimizers`); a multiplier changed to or from 1 would
    fail in the optimizer's own ``load_state_dict`` after the run started. A checkpoint from
    before the option counts as 1 (its two groups).
    """
    if saved["prototypes"] == "Decoupled":
        return  # buffers only: two groups whatever the multiplier
    before = saved.get("prototypes.lr_multiplier", 1.0)
    after = model_hparams.get("prototypes.lr_multiplier", 1.0)
    if (before != 1.0) != (after != 1.0):
        raise ValueError(
            f"--ckpt_path {path}: model.prototypes.lr_multiplier is {before!r} in the "
            f"checkpoint but {after!r} in this run: a multiplier of 1 keeps 2 optimizer groups, "
            "any other value 3, so the saved optimizer state cannot load (keep it 1, or keep "
            "it not 1)"
        )
