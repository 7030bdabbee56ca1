"""Resume compatibility: a checkpoint that cannot continue this run is a one-line error.

:func:`check_resume_compatible` compares a checkpoint with the run about to resume from it,
before any step: another configuration (K, d, host, prototype kind, ...), another optimizer
layout or, mid-epoch, another process layout is refused; settings that may differ are
returned as notes. Those include the trainer's: every checkpoint holds the schedules'
horizon and the trainer settings behind it (:func:`schedule_record`, written by the run
report), so a resume with another ``max_steps`` says the schedules change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import lightning as L

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


#: The checkpoint entry of :func:`schedule_record` (absent from checkpoints of before it).
SCHEDULE_KEY = "protogmm_schedule"

#: Trainer settings that change what a step computes; changed on resume, they are a note.
#: The loop limits (``max_epochs``, ``max_steps``) are compared through the schedules'
#: horizon instead: a run that only stops elsewhere is still an exact continuation.
TRAINER_RESULT_KEYS = (
    "accumulate_grad_batches",
    "limit_train_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)


def trainer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer settings a resume compares, as plain values (read before any step).

    ``max_epochs`` as Lightning resolves it at fit (unset: 1000, or -1 under ``max_steps``).
    """
    max_steps = int(trainer.max_steps)
    max_epochs = trainer.max_epochs
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    # An enum: stored as its plain string (weights_only=True could not read the enum back).
    algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
    return {
        "max_epochs": int(max_epochs),
        "max_steps": max_steps,
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "limit_train_batches": trainer.limit_train_batches,
        "precision": str(trainer.precision),
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": None if algorithm is None else str(algorithm),
    }


def schedule_record(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """What a checkpoint stores under :data:`SCHEDULE_KEY`: :func:`trainer_settings`, the
    schedules' ``horizon`` in optimizer steps and the ``training_batches`` of an epoch."""
    record = trainer_settings(trainer)
    batches = trainer.num_training_batches
    record["training_batches"] = int(batches) if math.isfinite(batches) else None
    record["horizon"] = None
    with contextlib.suppress(Exception):  # advisory: a save must never fail over it
        record["horizon"] = int(pl_module.schedule_horizon())
    return record


def _horizon(record: Mapping[str, Any], settings: Mapping[str, Any]) -> int | None:
    """The schedules' horizon that ``settings`` give the checkpoint's data, as Lightning's
    ``estimated_stepping_batches`` computes it (None: it cannot be told before the fit)."""
    batches = record.get("training_batches")
    limit = settings["limit_train_batches"]
    if batches is None or not _same(record.get("limit_train_batches"), limit):
        return None  # another limit: the new epoch's batches are known only to the fit
    max_steps, max_epochs = settings["max_steps"], settings["max_epochs"]
    if max_epochs == -1:
        return None if max_steps == -1 else max_steps
    steps = math.ceil(batches / settings["accumulate_grad_batches"]) * max(max_epochs, 1)
    return steps if max_steps == -1 else min(steps, max_steps)


def _trainer_notes(
    record: Any, settings: Mapping[str, Any], saved: Mapping[str, Any], model: Mapping[str, Any]
) -> list[str]:
    """Notes on trainer settings that make a resume no exact continuation (none for a
    checkpoint of before :data:`SCHEDULE_KEY`: nothing to compare against)."""
    if not isinstance(record, Mapping):
        return []
    notes = [
        f"trainer.{key}: {record[key]!r} -> {settings[key]!r}"
        for key in TRAINER_RESULT_KEYS
        if key in record and not _same(record[key], settings[key])
    ]
    before = record.get("horizon")
    if before is None or {saved.get("schedule_steps"), model.get("schedule_steps")} != {None}:
        return notes  # the schedules span model.schedule_steps: compared as a model setting
    after = _horizon(record, settings)
    if after == before:
        return notes  # e.g. max_steps past the end of max_epochs: the same schedules
    limits = ", ".join(
        f"trainer.{key}: {record[key]!r} -> {settings[key]!r}"
        for key in ("max_epochs", "max_steps")
        if key in record and not _same(record[key], settings[key])
    )
    span = f"{after} steps instead of {before}" if after is not None else f"not {before} steps"
    notes.append(
        f"{limits or 'trainer settings'}: the schedules (lr, weight decay, teacher momentum) "
        f"span {span} (--model.schedule_steps {before} keeps them, at their final values past "
        f"step {before}; set model.schedule_steps to the final length for runs to be extended)"
    )
    return notes


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
    trainer: L.Trainer | None = None,
) -> list[str]:
    """Check a checkpoint against the run about to resume from it, before any step.

    Args:
        path: the checkpoint (``--ckpt_path``).
        model_hparams: the new run's model hyperparameters.
        data_hparams: the new run's data-module hyperparameters (None: not checked).
        world_size: processes of the new run (devices x nodes).
        trainer: the new run's trainer, not yet fitted (None: its settings are not
            checked). Settings that change the schedules' horizon (``max_steps``,
            ``max_epochs``, ``accumulate_grad_batches``) or what a step computes
            (:data:`TRAINER_RESULT_KEYS`) are notes, against the checkpoint's
            :func:`schedule_record`.

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
    record = checkpoint.get(SCHEDULE_KEY)
    notes = [
        f"model.{key}: {saved[key]!r} -> {model_hparams[key]!r}"
        for key in sorted(set(saved) & set(model_hparams))
        if key not in STRUCTURAL_KEYS
        and not _same(saved[key], model_hparams[key])
        and not _keeps_the_schedules(key, saved, model_hparams, record)
    ]
    if trainer is not None:
        notes += _trainer_notes(record, trainer_settings(trainer), saved, model_hparams)
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


def _keeps_the_schedules(
    key: str, saved: Mapping[str, Any], model: Mapping[str, Any], record: Any
) -> bool:
    """Whether ``key`` is a ``schedule_steps`` newly set to the horizon the checkpoint's
    schedules spanned: the same schedules, not a change (what the horizon note advises)."""
    return (
        key == "schedule_steps"
        and saved.get(key) is None
        and isinstance(record, Mapping)
        and record.get("horizon") is not None
        and model.get(key) == record["horizon"]
    )


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
