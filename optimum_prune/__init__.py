"""optimum-prune: one-shot pruning for Hugging Face causal language models.

The public names load on first use. Importing the package registers the model classes of
heterogeneous pruned checkpoints with transformers' Auto classes (``optimum_prune.modeling``), so
that ``AutoModelForCausalLM.from_pretrained`` loads them without ``trust_remote_code``. The one
exception is the optimum-cli registration hook, which imports the package only to list the
``prune`` command: it must stay free of torch and transformers (seconds on every optimum-cli
call), and the command registers the classes itself when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING


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
    "PruneReport": "calibration.report",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimum_prune' has no attribute {name!r}")


if "optimum.commands.register.register_prune" not in sys.modules:
    from . import modeling  # noqa: E402,F401  (registers the Auto classes)


if TYPE_CHECKING:  # pragma: no cover
    from .calibration.data import calibration_windows
    from .calibration.report import PruneReport
    from .configuration import PruningConfig
    from .errors import PruningError
    from .evaluation.perplexity import perplexity
    from .methods.base import PruneResult, PruningMethod
    from .patterns import SparsityPattern, Target
    from .pruner import Pruner, load_model, save_pruned
    from .registry import available_methods, get_method, register_method
