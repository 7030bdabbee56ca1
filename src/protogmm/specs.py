"""Options chosen by class: the host and the prototype kind, stored as plain values.

``--model.host IBOT --model.host.patch_weight 0.5`` picks a class and its typed options
(jsonargparse's class selection). A checkpoint cannot hold the object (weights-only loading
reads plain values only), so it holds the object's :meth:`ConfigSpec.spec`: the class path
and the options that differ from the defaults. :meth:`ConfigSpec.build` rebuilds the object
from that, from the object itself, or from a short name (``"ibot"``, ``"joint"``, as configs
and checkpoints before the classes held it). Only subclasses of the expected base that are
already imported can be built, so a checkpoint cannot make protogmm import anything.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["ConfigSpec", "class_choices", "class_path"]

SpecT = TypeVar("SpecT", bound="ConfigSpec")


class ConfigSpec:
    """A configuration class whose constructor's arguments are kept as same-named attributes."""

    #: Short name (logs, reports, the legacy string form); subclasses set it.
    name: str = ""

    def init_args(self) -> dict[str, Any]:
        """Every constructor argument with its current value."""
        return {key: getattr(self, key) for key in _parameters(type(self))}

    def fresh(self: SpecT) -> SpecT:
        """A new instance with the same options (a host holds per-run state: each run builds
        its own, so one object given to two runs is not shared)."""
        return type(self)(**self.init_args())

    def spec_value(self, key: str, value: Any) -> Any:
        """The plain value of one option in :meth:`spec` (override for rich values)."""
        return value

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {options that differ from the defaults}}``."""
        defaults = _parameters(type(self))
        overrides = {
            key: self.spec_value(key, value)
            for key, value in self.init_args().items()
            if not _equal(value, defaults[key])
        }
        return {"class_path": class_path(type(self)), "init_args": overrides}

    @classmethod
    def build(cls: type[SpecT], value: Any, key: str) -> SpecT:
        """An instance of ``cls`` (or a subclass) from an instance, a spec or a short name.

        Args:
            value: an instance; ``{"class_path": ..., "init_args": {...}}``; or a class or
                short name (``"IBOT"``, ``"ibot"``: its defaults).
            key: the option's name for errors (``"model.host"``).

        Raises:
            ValueError: one line naming ``key``: an unknown class or a bad option.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return _find_subclass(cls, value, key)()
        if isinstance(value, Mapping) and "class_path" in value:
            unknown = sorted(set(value) - {"class_path", "init_args"})
            if unknown:
                raise ValueError(f"{key}: unknown key(s) {unknown} beside class_path, init_args")
            subclass = _find_subclass(cls, str(value["class_path"]), key)
            args = dict(value.get("init_args") or {})
            known = _parameters(subclass)
            extra = sorted(set(args) - set(known))
            if extra:
                raise ValueError(
                    f"{key}: {subclass.__name__} has no option(s) {', '.join(extra)}; it takes "
                    f"{', '.join(known) or 'none'}"
                )
            return subclass(**args)
        raise ValueError(
            f"{key}: expected a {cls.__name__} (a class name such as "
            f"{', '.join(class_choices(cls))}), got {value!r}"
        )


def class_choices(base: type) -> list[str]:
    """The class names a ``base``-typed option takes (sorted)."""
    return sorted(c.__name__ for c in _subclasses(base))


def _parameters(cls: type) -> dict[str, Any]:
    """The constructor's keyword parameters and their defaults; a ``**options`` handed to
    the parent class's constructor stands for the parent's (as jsonargparse reads it)."""
    parameters = inspect.signature(cls.__init__).parameters
    found = {
        name: parameter.default
        for name, parameter in parameters.items()
        if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
    }
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        parent = cls.__mro__[1]
        found = _parameters(parent) | found if parent is not object else found
    return found


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _subclasses(cls: type) -> list[type]:
    """``cls`` and its imported subclasses that can be built (those that name themselves)."""
    found, stack = [], [cls]
    while stack:
        current = stack.pop()
        if getattr(current, "name", ""):
            found.append(current)
        stack.extend(current.__subclasses__())
    return found


def _find_subclass(cls: type[SpecT], wanted: str, key: str) -> type[SpecT]:
    """The subclass named by its class path, its class name or its short name."""
    for candidate in _subclasses(cls):
        names = {
            f"{candidate.__module__}.{candidate.__qualname__}",
            candidate.__qualname__.lower(),
            candidate.name,
        }
        if wanted in names or wanted.lower() in names or class_path(candidate) == wanted:
            return candidate
    choices = ", ".join(class_choices(cls))
    raise ValueError(f"{key}: unknown {cls.__name__} {wanted!r}; choose one of {choices}")


def class_path(cls: type) -> str:
    """``protogmm.hosts.IBOT`` for ``protogmm.hosts.ibot.IBOT`` where the package re-exports
    it (the path users write), else the defining module's."""
    package = cls.__module__.rsplit(".", 1)[0]
    if getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"
