"""Method registry: methods register under a name, the config and the pruner look them up.

The built-in methods are a table of names to ``module:Class`` (``BUILTIN_METHODS``): listing them
imports nothing, and looking one up imports only its module. A method class carries its own
``name`` and ``aliases``; methods never import the registry (no import cycle). Other methods
register by decorator::

    @register_method("my-method", aliases=("mm",))
    class MyMethod(PruningMethod): ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import PruningError


if TYPE_CHECKING:
    from .methods.base import PruningMethod

#: name -> "module of optimum_prune.methods:class"; aliases -> name
BUILTIN_METHODS = {
    "alps": "alps:ALPS",
    "block-influence": "block_influence:BlockInfluence",
    "expert-drop": "expert_drop:ExpertDrop",
    "fasp": "fasp:FASP",
    "fista": "fista:FISTAPruner",
    "magnitude": "magnitude:Magnitude",
    "policy_gradient": "policy_gradient:PolicyGradient",
    "sparsefw": "sparsefw:SparseFW",
    "sparsegpt": "sparsegpt:SparseGPT",
    "spap": "spap:SPAP",
    "wanda": "wanda:Wanda",
    "wanda-sp": "wanda_sp:WandaSP",
}
BUILTIN_ALIASES = {"pg": "policy_gradient", "reap": "expert-drop", "shortgpt": "block-influence"}

_METHODS: dict[str, type["PruningMethod"]] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator registering a `PruningMethod` subclass under `name` (and shorter ``aliases``,
    which configs accept and turn into ``name``)."""

    def wrapper(cls):
        for key in (name, *aliases):
            taken = _METHODS.get(_ALIASES.get(key, key))
            if taken is None and (key in BUILTIN_METHODS or key in BUILTIN_ALIASES):
                taken = _builtin(key)
            if taken is not None and taken is not cls:
                raise ValueError(f"A pruning method named {key!r} is already registered ({taken.__name__}).")
        cls.name, cls.aliases = name, tuple(aliases)
        _METHODS[name] = cls
        _ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return wrapper


def _builtin(name: str) -> type["PruningMethod"]:
    name = BUILTIN_ALIASES.get(name, name)
    if name not in _METHODS:
        module, _, class_name = BUILTIN_METHODS[name].partition(":")
        cls = getattr(importlib.import_module(f"optimum_prune.methods.{module}"), class_name)
        _METHODS[name] = cls
        _ALIASES.update(dict.fromkeys(cls.aliases, name))
    return _METHODS[name]


def available_methods() -> list[str]:
    """The names of every method, built-in or registered (imports none of them)."""
    return sorted(set(BUILTIN_METHODS) | set(_METHODS))


def canonical_name(name: str) -> str:
    """The name ``name`` (a name or an alias) is registered under; `PruningError` listing the
    methods when none (imports nothing)."""
    if isinstance(name, str):
        name = _ALIASES.get(name, BUILTIN_ALIASES.get(name, name))
        if name in _METHODS or name in BUILTIN_METHODS:
            return name
    raise PruningError(f"Unknown pruning method {name!r}; choose one of: {', '.join(available_methods())}.")


def get_method(name: str) -> type["PruningMethod"]:
    """The method class registered under ``name`` (or an alias of it)."""
    name = canonical_name(name)
    return _METHODS[name] if name in _METHODS else _builtin(name)
