"""optimum-prune: one-shot pruning for Hugging Face causal language models.

Importing the package is light: no torch, no transformers modelling class (the optimum-cli
registration hook and every CLI call import it). The public names load on first use, and the model
classes of heterogeneous pruned checkpoints register with transformers' Auto classes when a config
of theirs is first loaded (`auto_registration`), so that ``AutoModelForCausalLM.from_pretrained``
loads them without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


from .auto_registration import install as install_auto_registration
from .version import __version__

_LAZY = {
    "PruningConfig": "configuration",
    "SparsityPattern": "patterns",
    "PruningError": "errors",
    "Pruner": "pruner",
    "save_pruned": "pruner",
    "load_model": "pruner",
    "register_method": "registry",
    "get_method": "registry",
    "available_methods": "registry",
    "PruningMethod": "methods.base",
    "PruneResult": "methods.base",
    "Target": "patterns",
    "perplexity": "evaluation.perplexity",
    "calibration_windows": "calibration.data",
    "PruneReport": "engine.report",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimum_prune' has no attribute {name!r}")


install_auto_registration()


if TYPE_CHECKING:  # pragma: no cover
    from .calibration.data import calibration_windows
    from .engine.report import PruneReport
    from .configuration import PruningConfig
    from .errors import PruningError
    from .evaluation.perplexity import perplexity
    from .methods.base import PruneResult, PruningMethod
    from .patterns import SparsityPattern, Target
    from .pruner import Pruner, load_model, save_pruned
    from .registry import available_methods, get_method, register_method
