"""What the commands share about their command lines: one-line errors and the rewriting of
``fit``'s arguments before jsonargparse reads them.

:class:`ConfigError` and :func:`_one_line` fold a parser's message onto the one line
``main`` prints, :class:`CommandParser` is the argparse parser whose errors are that line;
``fit``'s argv is rewritten first (:func:`_class_names`, :func:`_nested_nulls`) and its
config files checked (:func:`_check_config_files`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, NoReturn

import yaml

from protogmm.hosts import Host
from protogmm.prototypes.kinds import PrototypeKind
from protogmm.specs import ConfigSpec, class_choices
from protogmm.training.legacy_hparams import moved_option_hint


class ConfigError(ValueError):
    """A bad command line or configuration, reported as one line before training starts."""


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose errors are :class:`ConfigError`\\ s: ``main`` prints them as
    one line (``protogmm demo: error: ...``), without argparse's usage text."""

    def error(self, message: str) -> NoReturn:
        """Raise the parser's complaint.

        Raises:
            ConfigError: ``message`` (e.g. "unrecognized arguments: --bogus").
        """
        raise ConfigError(message)


def _one_line(text: str) -> str:
    """The parser's error message (after its usage text) folded onto one line, with where
    an option moved when the host and prototype kinds became classes."""
    message = text[text.rfind("error:") + len("error:") :] if "error:" in text else text
    return _explain(" ".join(message.split()))[:500]


#: The class-valued model options and their classes' base.
_CLASS_OPTIONS: dict[str, type[ConfigSpec]] = {
    "model.host": Host,
    "model.prototypes": PrototypeKind,
}


#: How a parser message's types read in ours (``None`` is ``null`` on the command line).
_TYPE_NAMES = {"NoneType": "null", "int": "an integer", "float": "a number", "str": "a string"}


def _explain(message: str) -> str:
    """A parser message made actionable: a flat option of before the classes names its new
    place; an option of a class of the wrong type names its full key; a bad class names the
    choices."""
    for key in re.findall(r"model\.([a-z_0-9]+)", message):
        hint = moved_option_hint(key)
        if hint and not re.search(rf"model\.(host|prototypes)\.{key}\b", message):
            return f"{hint} (the host and the prototype kind are classes now, with their options)"
    for option, base in _CLASS_OPTIONS.items():
        if f'Parser key "{option}"' not in message:
            continue
        typed = re.search(
            r"Problem with given class_path '[\w.]+': Parser key \"([\w.]+)\": Does not validate "
            r"against any of the Union subtypes Subtypes: \[(.*?)\].*? Given value: (.*?) - ",
            message,
        )
        if typed:  # an option of the class of the wrong type, e.g. top_k none (not null)
            types = [_TYPE_NAMES.get(name, name) for name in re.findall(r"'([\w.]+)'", typed[2])]
            expected = " or ".join(types) or typed[2]
            return f"{option}.{typed[1]}: expected {expected}, got {typed[3]!r}"
        problem = re.search(r"Problem with given class_path '([\w.]+)': (.*?) - Expected", message)
        if problem:  # the class is right, one of its options is not
            return f"{option}: {problem.group(1)}: {problem.group(2)}"
        given = re.search(r"Given value: (\S+)", message)
        if given:
            choices = ", ".join(class_choices(base))
            return (
                f"{option}: expected a class ({choices}; its options as {option}.<option>, or "
                f"in a config under {option}: {{class_path: ..., init_args: {{...}}}}), got "
                f"{given.group(1)!r}; the parser said: {message}"
            )
    return message


def _class_names(args: list[str]) -> list[str]:
    """``--model.host ibot`` as ``--model.host IBOT``: the short names of before the classes
    (any case) are taken on the command line."""
    out = list(args)
    for index, arg in enumerate(out):
        for option, base in _CLASS_OPTIONS.items():
            value_index = None
            if arg == f"--{option}" and index + 1 < len(out):
                value_index, value = index + 1, out[index + 1]
            elif arg.startswith(f"--{option}="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                name = type(base.build(value, option)).__name__
            except (ValueError, TypeError):
                continue  # a class path or a bad name: the parser judges it
            if value_index is None:
                out[index] = f"--{option}={name}"
            else:
                out[value_index] = name
    return out


#: YAML's spellings of null.
_NULLS = frozenset({"null", "Null", "NULL", "~"})


def _nested_nulls(args: list[str]) -> list[str]:
    """``--model.prototypes.gmm.top_k null`` as ``--model.prototypes.gmm={"top_k": null}``.

    jsonargparse parses an option nested in a class option's argument (``gmm.top_k`` of
    ``model.prototypes``) a second time, from the text ``--gmm.top_k=<parsed value>``: null
    comes back as the string "None", which an ``int | None`` rejects (and a ``str | None``
    would take as text). Given as a mapping for the argument, merged with its other options
    as any ``--model.prototypes.gmm.*`` is, the null stays null.
    """
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        name, sep, value = arg.partition("=")
        option = next((o for o in _CLASS_OPTIONS if name.startswith(f"--{o}.")), None)
        if option is None or "." not in name[len(option) + 3 :]:
            out.append(arg)
            continue
        if not sep and index < len(args):
            value = args[index]
            if value in _NULLS:
                index += 1
        if value not in _NULLS:
            out.append(arg)
            continue
        argument, *path = name[len(option) + 3 :].split(".")
        nested: Any = None
        for key in reversed(path):
            nested = {key: nested}
        out.append(f"--{option}.{argument}={json.dumps(nested)}")
    return out


def _check_config_files(args: list[str]) -> None:
    """A ``--config`` file that is empty, not YAML or not a mapping of keys is one line naming
    it (jsonargparse says "Unexpected config: <its text>" without the file's name)."""
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            path = Path(args[index + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            content = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not a text file (not UTF-8)") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ConfigError(f"--config {path}: not valid YAML ({problem}{where})") from None
        if content is None:
            raise ConfigError(f"--config {path}: the file is empty (no keys to set)")
        if not isinstance(content, dict):
            raise ConfigError(
                f"--config {path}: expected a YAML mapping of keys (e.g. `trainer: "
                f"{{max_epochs: 5}}`), got {type(content).__name__} {_preview(content)}"
            )


def _preview(value: Any) -> str:
    """The start of a value's text, on one line, for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
