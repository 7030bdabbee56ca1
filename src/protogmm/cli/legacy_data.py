"""The flat ``--data.*`` keys of before the option groups, still read everywhere.

Until the data module's options came in groups, ``synthetic_samples``, ``imbalance_ratio``,
``knn_train_samples``, ... sat directly under ``data``. Configs, command lines and documents
of that time keep working, rewritten to today's keys before the parser sees them (the table
is :data:`protogmm.training.legacy_hparams.MOVED_DATA_KEYS`):

- on the command line, ``--data.synthetic_samples 64`` is ``--data.synthetic.samples 64``
  (:func:`upgrade_data_argv`);
- in a YAML config (``--config``, ``--data FILE``, a run's ``config.yaml``), ``data:
  {synthetic_samples: 64}`` is ``data: {synthetic: {samples: 64}}``: the parsers of
  ``fit``, ``eval`` and ``diagnose`` load YAML in :data:`PARSER_MODE`, jsonargparse's YAML
  loader followed by :func:`upgrade_config`.

Checkpoints' and ``hparams.yaml``'s flat data settings are upgraded where they are read
(:func:`protogmm.training.legacy_hparams.upgrade_data_hparams`).
"""

from __future__ import annotations

from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

from protogmm.training.legacy_hparams import MOVED_DATA_KEYS, upgrade_data_hparams

__all__ = ["PARSER_MODE", "upgrade_config", "upgrade_data_argv"]

#: The parser mode of protogmm's commands: YAML, with flat data keys moved into their groups.
PARSER_MODE = "protogmm_yaml"

_load_yaml = get_loader("yaml")


def upgrade_config(value: Any) -> Any:
    """A loaded config (or value) with the flat data keys moved into their groups.

    A whole config holds them under ``data``; a data file (``--data FILE``) at its top;
    anything else (a single value, another section) comes back unchanged.
    """
    if not isinstance(value, dict):
        return value
    data = value.get("data")
    if isinstance(data, dict) and MOVED_DATA_KEYS.keys() & data.keys():
        value = {**value, "data": upgrade_data_hparams(data)}
    if MOVED_DATA_KEYS.keys() & value.keys():
        value = upgrade_data_hparams(value)
    return value


def _load(text: str) -> Any:
    return upgrade_config(_load_yaml(text))


set_loader(PARSER_MODE, _load, exceptions=(yaml.YAMLError,))


def upgrade_data_argv(args: list[str]) -> list[str]:
    """``--data.synthetic_samples 64`` as ``--data.synthetic.samples 64`` (also ``KEY=VALUE``);
    every other argument unchanged."""
    upgraded = []
    for arg in args:
        name, sep, value = arg.partition("=")
        old = name.removeprefix("--data.") if name.startswith("--data.") else ""
        if old in MOVED_DATA_KEYS:
            group, option = MOVED_DATA_KEYS[old]
            arg = f"--data.{group}.{option}{sep}{value}"
        upgraded.append(arg)
    return upgraded
