"""Built-in pruning methods; importing this package registers them."""

from .alps import ALPS
from .base import PruneResult, PruningMethod
from .magnitude import Magnitude
from .masks import Target, measured_sparsity, nm_prune_mask, prune_mask, satisfies_nm
from .sparsegpt import SparseGPT
from .wanda import Wanda


__all__ = [
    "ALPS",
    "Magnitude",
    "PruneResult",
    "PruningMethod",
    "SparseGPT",
    "Target",
    "Wanda",
    "measured_sparsity",
    "nm_prune_mask",
    "prune_mask",
    "satisfies_nm",
]
