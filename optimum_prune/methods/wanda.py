"""Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||_2``, compared within each output row.

No weight update; the only statistic is the per-input sum of squares over calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice
from .base import PruneResult, PruningMethod
from .masks import prune_mask


@dataclass
class WandaOptions:
    #: "row" (the paper's per-output comparison group) or "matrix".
    scope: str = "row"

    def __post_init__(self):
        check_choice(self.scope, "wanda option scope", ("row", "matrix"))


def wanda_scores(weight, stats):
    return weight.abs() * stats.input_norm.to(weight.dtype).unsqueeze(0)


class Wanda(PruningMethod):
    name = "wanda"
    Options = WandaOptions
    statistics = frozenset({"sq_norm"})

    def prune_weight(self, weight, stats, target):
        mask = prune_mask(wanda_scores(weight, stats), target, scope=self.options.scope)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)
