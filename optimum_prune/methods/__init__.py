"""Built-in pruning methods; importing this package registers them."""

from .alps import ALPS
from .base import PruneResult, PruningMethod
from .block_influence import BlockInfluence
from .expert_drop import ExpertDrop
from .fasp import FASP
from .fista import FISTAPruner
from .magnitude import Magnitude
from .policy_gradient import PolicyGradient
from .masks import Target, measured_sparsity, nm_prune_mask, prune_mask, satisfies_nm
from .sparsefw import SparseFW
from .sparsegpt import SparseGPT
from .spap import SPAP
from .wanda import Wanda
from .wanda_sp import WandaSP


__all__ = [
    "ALPS",
    "BlockInfluence",
    "ExpertDrop",
    "FASP",
    "FISTAPruner",
    "Magnitude",
    "PolicyGradient",
    "PruneResult",
    "PruningMethod",
    "SPAP",
    "SparseFW",
    "SparseGPT",
    "Target",
    "Wanda",
    "WandaSP",
    "measured_sparsity",
    "nm_prune_mask",
    "prune_mask",
    "satisfies_nm",
]
