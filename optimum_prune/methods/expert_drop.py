"""Expert drop: remove whole routed experts of every MoE block, the least important first.

Scores (``score`` option), from what calibration saw of each expert (`ExpertUsage`):

- ``reap`` (REAP, Lasby et al. 2025, "REAP the Experts"): the router-weighted expert activation
  norm, ``mean over the tokens routed to e of g_e(x) * ||f_e(x)||`` -- how much the expert adds to
  the block's output when it is chosen. An expert that received no token scores 0.
- ``frequency``: the number of tokens routed to the expert (the usage baseline).
- ``random``: a seeded random order (``seed``); needs no calibration.

The block's router loses the removed experts' rows, so tokens are routed among the experts left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruningError
from .base import PruningMethod


SCORES = ("reap", "frequency", "random")


@dataclass
class ExpertDropOptions:
    #: Expert importance: "reap" (router-weighted activation norm), "frequency" (tokens routed), "random".
    score: str = "reap"
    #: Seed of the "random" order.
    seed: int = 0

    def __post_init__(self):
        if self.score not in SCORES:
            raise PruningError(f"expert-drop option score must be one of {', '.join(SCORES)}, got {self.score!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise PruningError(f"expert-drop option seed must be an integer, got {self.seed!r}.")


class ExpertDrop(PruningMethod):
    name = "expert-drop"
    aliases = ("reap",)
    Options = ExpertDropOptions
    supported_patterns = ("structured",)
    removes_experts = True
    workspace_copies = (0, 0)

    @property
    def needs_calibration(self) -> bool:
        return self.options.score != "random"

    def expert_scores(self, usage):
        if self.options.score == "frequency":
            return usage.tokens.to(torch.float64)
        if self.options.score == "random":
            generator = torch.Generator().manual_seed(self.options.seed)
            return torch.rand(usage.num_experts, generator=generator, dtype=torch.float64)
        return usage.weighted_norm.to(torch.float64) / usage.tokens.clamp(min=1).to(torch.float64)
