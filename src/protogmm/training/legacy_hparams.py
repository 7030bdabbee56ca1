"""Settings in the flat layouts of checkpoints and configs of earlier versions.

Model: until the hosts and prototype kinds became classes, every option sat directly under
``model`` (``host: ibot``, ``ibot_patch_weight``, ``koleo_weight``, ``gmm``, ...). Those
checkpoints still load, resume and compare: :func:`upgrade_model_hparams` rewrites such a
mapping into today's layout (``host`` and ``prototypes`` as class specs, each with its own
options), and :func:`moved_option_hint` tells a config's author where an option went.

Data: until the data module's options came in groups, every one sat directly under ``data``
(``synthetic_samples``, ``imbalance_ratio``, ``knn_train_samples``, ...).
:func:`upgrade_data_hparams` moves them into their groups (``synthetic: {samples: ...}``);
:data:`MOVED_DATA_KEYS` says where each went (old configs and command lines are rewritten
with it, see :mod:`protogmm.cli.legacy_data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from protogmm.hosts import CARP, DINO, IBOT, Host
from protogmm.prototypes.kinds import Decoupled, Joint, Partial, PrototypeKind
from protogmm.specs import class_path

__all__ = [
    "LEGACY_KEYS",
    "checkpoint_model_hparams",
    "MOVED_DATA_KEYS",
    "moved_option_hint",
    "upgrade_data_hparams",
    "upgrade_model_hparams",
]

_DINO_KEYS = {
    "student_temperature": "student_temperature",
    "teacher_temperature": "teacher_temperature",
    "warmup_teacher_temperature": "warmup_teacher_temperature",
    "teacher_temperature_warmup_epochs": "teacher_temperature_warmup_epochs",
    "center_momentum": "center_momentum",
}
#: Old flat key -> the option of each host class that took it over.
_HOST_KEYS: dict[type[Host], dict[str, str]] = {
    DINO: _DINO_KEYS,
    IBOT: _DINO_KEYS
    | {
        "ibot_mask_ratio": "mask_ratio",
        "ibot_mask_probability": "mask_probability",
        "ibot_mask_min_aspect": "mask_min_aspect",
        "ibot_patch_prototypes": "patch_prototypes",
        "ibot_num_patch_prototypes": "num_patch_prototypes",
        "ibot_patch_weight": "patch_weight",
        "teacher_patch_temperature": "teacher_patch_temperature",
        "warmup_teacher_patch_temperature": "warmup_teacher_patch_temperature",
        "ibot_patch_gmm_samples": "patch_mixture_samples",
        "host_seed": "seed",
    },
    CARP: {
        "carp_block_size": "block_size",
        "carp_temperature": "temperature",
        "carp_entropy_weight": "entropy_weight",
        "host_seed": "seed",
    },
}
_JOINT_KEYS = {
    "prototype_init_scale": "init_scale",
    "prototype_lr_multiplier": "lr_multiplier",
    "koleo_weight": "koleo_weight",
    "freeze_prototypes_epochs": "freeze_epochs",
}
#: Old flat key -> the option of each prototype kind that took it over.
_KIND_KEYS: dict[type[PrototypeKind], dict[str, str]] = {
    Joint: _JOINT_KEYS,
    Partial: _JOINT_KEYS
    | {
        "clustering_target_temperature": "target_temperature",
        "clustering_temperature": "temperature",
    },
    Decoupled: {
        "gmm": "gmm",
        "gmm_anneal_fraction": "anneal_fraction",
        "targets": "targets",
        "posterior_temperature": "posterior_temperature",
        "target_balancing": "target_balancing",
    },
}
#: Every flat key that moved into ``host`` or ``prototypes``.
LEGACY_KEYS = frozenset(
    key for table in (*_HOST_KEYS.values(), *_KIND_KEYS.values()) for key in table
)


def upgrade_model_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Today's model hyperparameters from a mapping in either layout.

    A mapping already in today's layout comes back unchanged. In the flat layout, the host
    (``"dino"``, ``"ibot"``, ``"carp"``) and the prototype kind (``"joint"``, ``"decoupled"``,
    ``"partial"``) become class specs holding the options that apply to them; flat options
    that applied to another host or kind (they had no effect) are dropped.
    """
    flat = dict(hparams)
    host, kind = flat.get("host", "dino"), flat.get("prototypes", "decoupled")
    if not isinstance(host, str) and not isinstance(kind, str) and not LEGACY_KEYS & set(flat):
        return flat
    for key, base, tables in (
        ("host", Host, _HOST_KEYS),
        ("prototypes", PrototypeKind, _KIND_KEYS),
    ):
        value = flat.get(key, "dino" if key == "host" else "decoupled")
        if isinstance(value, str):
            cls = type(base.build(value, f"model.{key}"))
            args = {new: flat[old] for old, new in tables[cls].items() if old in flat}
            flat[key] = {"class_path": class_path(cls), "init_args": args}
    for key in LEGACY_KEYS:
        flat.pop(key, None)
    return flat


def checkpoint_model_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's model hyperparameters in today's layout, with the defaults of the
    version that wrote it: a decoupled mixture saved without ``top_k`` was written while the
    dense update was the default, so it gets ``top_k = None`` (today's default is 8, which
    every checkpoint since saves)."""
    upgraded = upgrade_model_hparams(hparams)
    spec = upgraded.get("prototypes") or "decoupled"
    if not isinstance(PrototypeKind.build(spec, "model.prototypes"), Decoupled):
        return upgraded
    if isinstance(spec, str):
        spec = {"class_path": class_path(Decoupled), "init_args": {}}
    init_args = dict(spec.get("init_args") or {})
    gmm = dict(init_args.get("gmm") or {})
    if "top_k" not in gmm:
        init_args["gmm"] = gmm | {"top_k": None}
        upgraded["prototypes"] = {**spec, "init_args": init_args}
    return upgraded


def moved_option_hint(key: str) -> str | None:
    """Where a flat ``model.<key>`` went (for a config written before the classes)."""
    places: dict[str, list[str]] = {}
    for group, tables in (("host", _HOST_KEYS), ("prototypes", _KIND_KEYS)):
        for cls, table in tables.items():
            if key in table:
                places.setdefault(f"model.{group}.{table[key]}", []).append(cls.__name__)
    if not places:
        return None
    return f"model.{key} moved to " + " or ".join(
        f"{new} (with {new.rsplit('.', 1)[0]} {' or '.join(classes)})"
        for new, classes in places.items()
    )


#: Old flat data key -> (its group, its option there).
MOVED_DATA_KEYS: dict[str, tuple[str, str]] = {
    "synthetic_samples": ("synthetic", "samples"),
    "synthetic_classes": ("synthetic", "classes"),
    "synthetic_image_size": ("synthetic", "image_size"),
    "synthetic_imbalance_ratio": ("synthetic", "imbalance_ratio"),
    "imbalance_ratio": ("imbalance", "ratio"),
    "imbalance_n_max": ("imbalance", "n_max"),
    "imbalance_class_order": ("imbalance", "class_order"),
    "on_bad_image": ("images", "on_bad"),
    "scan_images": ("images", "scan"),
    "max_image_pixels": ("images", "max_pixels"),
    "longtail_thresholds": ("longtail", "thresholds"),
    "longtail_thresholds_relative": ("longtail", "relative"),
    "knn_train_samples": ("knn", "train_samples"),
    "knn_test_samples": ("knn", "test_samples"),
}


def upgrade_data_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Today's data-module settings from a mapping in either layout.

    Each flat key of before the groups moves into its group's mapping (only the keys
    present: a checkpoint older than an option leaves it to its default); a mapping in
    today's layout comes back unchanged. Where a group is given as well, its own options
    win over the flat ones.
    """
    upgraded = {key: value for key, value in hparams.items() if key not in MOVED_DATA_KEYS}
    for old, (group, option) in MOVED_DATA_KEYS.items():
        if old not in hparams:
            continue
        given = upgraded.get(group)
        if dataclasses.is_dataclass(given) and not isinstance(given, type):
            given = dataclasses.asdict(given)
        moved = dict(given) if isinstance(given, Mapping) else {}
        upgraded[group] = {option: hparams[old]} | moved
    return upgraded
