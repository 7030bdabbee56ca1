"""Model settings in the flat layout of checkpoints and configs before the host classes.

Until the hosts and prototype kinds became classes, every option sat directly under
``model`` (``host: ibot``, ``ibot_patch_weight``, ``koleo_weight``, ``gmm``, ...). Those
checkpoints still load, resume and compare: :func:`upgrade_model_hparams` rewrites such a
mapping into today's layout (``host`` and ``prototypes`` as class specs, each with its own
options), and :func:`moved_option_hint` tells a config's author where an option went.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protogmm.hosts import CARP, DINO, IBOT, Host
from protogmm.prototypes.kinds import Decoupled, Joint, Partial, PrototypeKind
from protogmm.specs import class_path

__all__ = ["LEGACY_KEYS", "moved_option_hint", "upgrade_model_hparams"]

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
