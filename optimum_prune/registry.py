"""Method registry: methods register under a name, the config and the pruner look them up.

Registration is by decorator on the method class::

    @register_method("wanda")
    class Wanda(PruningMethod): ...

The built-in methods live in ``optimum_prune.methods`` and are imported on first lookup, so that
importing the registry (e.g. to validate a config) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import PruningError


if TYPE_CHECKING:
    from .methods.base import PruningMethod

_METHODS: dict[str, type["PruningMethod"]] = {}
_ALIASES: dict[str, str] = {}
_BUILTINS_LOADED = False


def register_method(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator registering a `PruningMethod` subclass under `name` (and shorter ``aliases``,
    which configs accept and turn into ``name``)."""

    def wrapper(cls):
        for key in (name, *aliases):
            if key in _METHODS and _METHODS[key] is not cls:
                raise ValueError(f"A pruning method named {key!r} is already registered ({_METHODS[key].__name__}).")
        cls.name = name
        _METHODS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrapper


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("optimum_prune.methods")


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> type["PruningMethod"]:
    _load_builtins()
    try:
        return _METHODS[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise PruningError(
            f"Unknown pruning method {name!r}; choose one of: {', '.join(available_methods())}."
        ) from None
