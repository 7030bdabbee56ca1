"""The data arguments of ``protogmm eval`` and ``protogmm diagnose``: ``fit``'s ``--data.*``.

Both commands parse with jsonargparse and add :class:`SSLDataModule`'s signature under
``data``, as LightningCLI does for ``fit``: one definition (the data module's own arguments,
types and checks), so every ``--data.KEY VALUE`` that ``fit`` takes works here too, e.g.
``--data.dataset folder --data.root DIR --data.image_size 32`` or a group's option,
``--data.synthetic.samples 64``. The flat keys of before the groups
(``--data.synthetic_samples``) are still read (:mod:`protogmm.cli.legacy_data`). Short
forms, rewritten before parsing:

- ``--data NAME``: ``--data.dataset NAME``; ``--data FILE`` (an existing file) stays, a YAML
  file of data keys, as ``fit`` reads it;
- ``--data checkpoint``: the data the checkpoint was trained on, with the ``--data.*``
  given replacing the stored values (e.g. ``--data.root`` when the data moved);
- ``--data-root DIR`` and ``--data-arg KEY=VALUE``: ``diagnose``'s spellings from before
  ``--data.*``, i.e. ``--data.root DIR`` and ``--data.KEY VALUE`` (``KEY`` a flat key or a
  group's ``GROUP.OPTION``).

Parser errors are raised as one-line :class:`ConfigError`\\ s (``main`` prints them).
"""

from __future__ import annotations

import inspect
from argparse import ArgumentError
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from protogmm.cli.command_line import ConfigError, _one_line
from protogmm.cli.legacy_data import PARSER_MODE, upgrade_data_argv
from protogmm.training.data_settings import DATA_GROUPS
from protogmm.training.datamodule import DATASETS, SSLDataModule, datamodule_from_checkpoint
from protogmm.training.legacy_hparams import MOVED_DATA_KEYS

#: ``--data checkpoint``: rebuild the data module stored in the checkpoint.
FROM_CHECKPOINT = "checkpoint"
#: Every argument of the data module (the groups by their name).
DATA_KEYS: frozenset[str] = frozenset(
    name for name in inspect.signature(SSLDataModule.__init__).parameters if name != "self"
)
#: What ``--data-arg KEY=VALUE`` takes: a flat argument, a group's ``GROUP.OPTION``, or a
#: flat key of before the groups.
DATA_ARG_KEYS: frozenset[str] = (
    (DATA_KEYS - set(DATA_GROUPS))
    | {f"{group}.{field.name}" for group, cls in DATA_GROUPS.items() for field in fields(cls)}
    | set(MOVED_DATA_KEYS)
)


@dataclass(frozen=True)
class DataArguments:
    """What a command line asked for with ``--data`` and ``--data.*``.

    Attributes:
        given: the data-module arguments given (on the command line or in a ``--data``
            file), parsed and type-checked; a group as the mapping of its options given.
            The data module's defaults (or, with ``--data checkpoint``, the stored
            values) fill the rest.
        from_checkpoint: ``--data checkpoint``.
    """

    given: dict[str, Any]
    from_checkpoint: bool

    @property
    def requested(self) -> bool:
        """Whether any data argument was given (``diagnose`` measures usage only then)."""
        return self.from_checkpoint or bool(self.given)

    def datamodule(self, checkpoint: Path) -> SSLDataModule:
        """The data module asked for.

        Args:
            checkpoint: the command's checkpoint, read only for ``--data checkpoint``.

        Raises:
            ValueError: a bad value (one line naming ``data.KEY``), or a checkpoint without
                data-module arguments.
            OSError: a missing ``data.root`` or checkpoint.
        """
        if self.from_checkpoint:
            return datamodule_from_checkpoint(checkpoint, **self.given)
        return SSLDataModule(**self.given)


def command_parser(prog: str, description: str | None) -> ArgumentParser:
    """A parser with the data arguments, to which a command adds its own.

    Errors are raised (``exit_on_error=False``), not printed with the usage text, so that
    :func:`parse_command` can make them one line.

    Args:
        prog: the command, e.g. ``"protogmm eval"``.
        description: the ``--help`` text.
    """
    parser = ArgumentParser(
        prog=prog, description=description, exit_on_error=False, parser_mode=PARSER_MODE
    )
    parser.add_class_arguments(
        SSLDataModule,
        "data",
        help="the data, as `protogmm fit` takes it; --data NAME is --data.dataset NAME, "
        "--data checkpoint the checkpoint's own",
    )
    return parser


def parse_command(parser: ArgumentParser, argv: list[str]) -> tuple[Namespace, DataArguments]:
    """Parse a command line of a parser from :func:`command_parser`, data arguments included.

    Args:
        parser: the command's parser.
        argv: the command line after the command's name.

    Returns:
        The parsed command line (``--data.*`` under ``data``) and the data asked for.

    Raises:
        ConfigError: a bad command line, on one line.
    """
    argv, from_checkpoint = expand_data_shorthands(argv)
    try:
        config = parser.parse_args(argv)
        # Parsed again without defaults: which keys were given (``--data checkpoint``
        # replaces only those of the stored arguments).
        explicit = parser.parse_args(argv, defaults=False).get("data")
    except ArgumentError as error:
        raise ConfigError(_one_line(str(error))) from None
    given = _given(config.data, explicit.as_dict() if explicit is not None else {})
    return config, DataArguments(given=given, from_checkpoint=from_checkpoint)


def _given(parsed: Namespace, explicit: dict[str, Any]) -> dict[str, Any]:
    """The parsed value of each data argument given; of a group, the options given."""
    given: dict[str, Any] = {}
    for key in sorted(DATA_KEYS & set(explicit)):
        value = parsed[key]
        if key in DATA_GROUPS:
            # The options given only: ``--data checkpoint`` keeps the stored others.
            value = _plain(value)
            value = {option: value[option] for option in explicit[key] if option in value}
        given[key] = value
    return given


def _plain(value: Any) -> dict[str, Any]:
    """A group as parsed (a namespace, or the group's value) as a mapping of its options."""
    if isinstance(value, Namespace):
        return value.as_dict()
    return {field.name: getattr(value, field.name) for field in fields(value)}


def expand_data_shorthands(argv: list[str]) -> tuple[list[str], bool]:
    """Rewrite ``--data NAME``, ``--data-root`` and ``--data-arg`` as ``--data.*`` arguments.

    Args:
        argv: a command line.

    Returns:
        The command line in ``--data.KEY=VALUE`` form (flat keys of before the groups
        rewritten to their group's), and whether it said ``--data checkpoint`` (removed
        from it).

    Raises:
        ConfigError: a ``--data-arg`` that is not ``KEY=VALUE`` of a data-module argument.
    """
    expanded: list[str] = []
    from_checkpoint = False
    index = 0
    while index < len(argv):
        name, sep, value = argv[index].partition("=")
        index += 1
        if name not in ("--data", "--data-root", "--data-arg"):
            expanded.append(argv[index - 1])
            continue
        if not sep:
            if index == len(argv) or argv[index].startswith("-"):
                expanded.append(name)  # the parser says "expected one argument"
                continue
            value = argv[index]
            index += 1
        if name == "--data" and value == FROM_CHECKPOINT:
            from_checkpoint = True
        else:
            expanded.append(_expand(name, value))
    return upgrade_data_argv(expanded), from_checkpoint


def _expand(name: str, value: str) -> str:
    """One short-form data argument as the ``--data.KEY=VALUE`` it stands for."""
    if name == "--data-root":
        return f"--data.root={value}"
    if name == "--data-arg":
        key, sep, text = value.partition("=")
        if not sep or key not in DATA_ARG_KEYS:
            raise ConfigError(
                f"--data-arg {value!r}: expected KEY=VALUE with KEY one of "
                f"{sorted(DATA_ARG_KEYS - set(MOVED_DATA_KEYS))}"
            )
        return f"--data.{key}={text}"
    if value not in DATASETS and Path(value).is_file():
        return f"--data={value}"  # a YAML file of data keys, as `fit --data FILE` reads
    return f"--data.dataset={value}"  # an unknown name: the parser lists the datasets
