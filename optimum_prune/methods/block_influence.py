"""Block influence: remove whole decoder layers, or their attention / MLP blocks, the least
influential first (depth pruning).

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect") measures how much a decoder layer changes the residual stream: its block influence is
``BI = 1 - mean over the calibration tokens of cos(x_in, x_out)``, with ``x_in`` the hidden state a
layer reads and ``x_out`` the one it writes. A layer whose output is nearly its input (BI close to
0) is removed first, and the residual stream passes through. The engine measures the cosines on the
dense model in one pass and hands the method one influence per layer; the method picks the layers
to remove within the budget (``sparsity``: the fraction of the decoder layers' parameters).

Removing whole layers keeps a stock architecture (fewer ``num_hidden_layers``), which every serving
engine loads as it is.

``granularity`` picks the units: ``layer`` (ShortGPT), ``attention`` (attention blocks only, "Attention
Drop" of He et al. 2024, "What Matters in Transformers? Not All Attention is Needed"), ``mlp``, or
``block`` (attention and MLP blocks ranked together; a layer that loses both is removed whole). A
block's influence is the same measure on the residual stream around the block alone:
``1 - cos(h, h + a)`` for the attention block, ``1 - cos(h + a, h + a + m)`` for the MLP block. Layers
that keep one block are saved with the other as a ``no_op`` block (the Nemotron-NAS form for the
Llama family).

``score="loss"`` ranks by a measured baseline instead: the increase of the next-token loss on
``score_samples`` calibration windows when the unit alone is removed (one pass per candidate unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruningError
from .base import PruningMethod


GRANULARITIES = ("layer", "attention", "mlp", "block")


@dataclass
class BlockInfluenceOptions:
    #: Never remove the first and the last decoder layer (their influence is large in every model
    #: measured; kept out of the ranking to be safe against a misleading calibration text).
    keep_ends: bool = True
    #: The units removed: "layer" (whole decoder layers), "attention" or "mlp" (those blocks only),
    #: "block" (attention and MLP blocks ranked together).
    granularity: str = "layer"
    #: What ranks the units: "influence" (1 - cosine, one pass) or "loss" (the calibration loss
    #: increase when the unit alone is removed: one pass per unit over ``score_samples`` windows).
    score: str = "influence"
    score_samples: int = 8

    def __post_init__(self):
        if not isinstance(self.keep_ends, bool):
            raise PruningError(f"block-influence option keep_ends must be true or false, got {self.keep_ends!r}.")
        if self.score not in ("influence", "loss"):
            raise PruningError(f"block-influence option score must be influence or loss, got {self.score!r}.")
        if isinstance(self.score_samples, bool) or not isinstance(self.score_samples, int) or self.score_samples < 1:
            raise PruningError(f"block-influence option score_samples must be a whole number >= 1, got "
                               f"{self.score_samples!r}.")
        if self.granularity not in GRANULARITIES:
            raise PruningError(f"block-influence option granularity must be one of {', '.join(GRANULARITIES)}, got "
                               f"{self.granularity!r}.")


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

    def select(self, influence: torch.Tensor, params: torch.Tensor, remove_params: float, candidates: torch.Tensor,
               layer_of: torch.Tensor) -> torch.Tensor:
        """The indices (sorted) of the units to remove (``layer_of``: each unit's decoder layer): the
        candidates in order of increasing ``influence``, each taken when at least half of it fits in
        what is left of the budget ``remove_params`` (one that does not fit is passed over: a smaller
        unit after it may)."""
        allowed = candidates.clone()
        if self.options.keep_ends and int(layer_of.max()) > 1:
            allowed &= (layer_of != 0) & (layer_of != layer_of.max())
        order = [int(i) for i in torch.argsort(influence.double(), stable=True) if allowed[i]]
        removed, chosen = 0.0, []
        for index in order:
            if len(chosen) + 1 >= influence.numel():  # keep at least one unit
                break
            if removed + float(params[index]) / 2 > remove_params:
                continue
            chosen.append(index)
            removed += float(params[index])
        if not chosen:
            unit = {"layer": "layer", "block": "attention or MLP block"}.get(self.options.granularity,
                                                                               f"{self.options.granularity} block")
            smallest = float(params[order].min()) if order else float(params.max())
            raise PruningError(f"block-influence removes whole units ({unit}s): a sparsity of {remove_params:,.0f} "
                               f"parameters is less than half of the smallest {unit} ({smallest:,.0f}); raise the sparsity.")
        return torch.tensor(sorted(chosen), dtype=torch.long)
