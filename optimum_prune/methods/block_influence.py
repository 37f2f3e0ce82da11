"""Block influence: remove whole decoder layers, the least influential first (depth pruning).

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect") measures how much a decoder layer changes the residual stream: its block influence is
``BI = 1 - mean over the calibration tokens of cos(x_in, x_out)``, with ``x_in`` the hidden state a
layer reads and ``x_out`` the one it writes. A layer whose output is nearly its input (BI close to
0) is removed first, and the residual stream passes through. The engine measures the cosines on the
dense model in one pass and hands the method one influence per layer; the method picks the layers
to remove within the budget (``sparsity``: the fraction of the decoder layers' parameters).

Removing whole layers keeps a stock architecture (fewer ``num_hidden_layers``), which every serving
engine loads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruningError
from .base import PruningMethod


@dataclass
class BlockInfluenceOptions:
    #: Never remove the first and the last decoder layer (their influence is large in every model
    #: measured; kept out of the ranking to be safe against a misleading calibration text).
    keep_ends: bool = True

    def __post_init__(self):
        if not isinstance(self.keep_ends, bool):
            raise PruningError(f"block-influence option keep_ends must be true or false, got {self.keep_ends!r}.")


class BlockInfluence(PruningMethod):
    name = "block-influence"
    aliases = ("shortgpt",)
    Options = BlockInfluenceOptions
    supported_patterns = ("structured",)
    is_global = True
    removes_layers = True
    workspace_copies = (0, 0)

    @property
    def needs_calibration(self) -> bool:
        return True

    def select_layers(self, influence: torch.Tensor, params: torch.Tensor, remove_params: float,
                      candidates: torch.Tensor) -> torch.Tensor:
        """The indices (sorted) of the layers to remove: the candidates of lowest ``influence``
        first, each taken while the parameters removed stay nearest to ``remove_params`` (a layer
        is taken when at least half of it fits in what is left of the budget)."""
        allowed = candidates.clone()
        if self.options.keep_ends and allowed.numel() > 2:
            allowed[0] = allowed[-1] = False
        order = [int(i) for i in torch.argsort(influence.double(), stable=True) if allowed[i]]
        removed, chosen = 0.0, []
        for index in order:
            if len(chosen) + 1 >= influence.numel():  # keep at least one layer
                break
            if removed + float(params[index]) / 2 > remove_params:
                break
            chosen.append(index)
            removed += float(params[index])
        if not chosen:
            smallest = float(params[order[0]]) if order else float(params.max())
            raise PruningError(f"block-influence removes whole decoder layers: a sparsity of "
                               f"{remove_params / float(params.sum()):.3f} of the decoder layers' parameters is less "
                               f"than half a layer ({smallest / float(params.sum()):.3f} each); raise the sparsity.")
        return torch.tensor(sorted(chosen), dtype=torch.long)
