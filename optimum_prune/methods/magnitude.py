"""Magnitude pruning: remove the smallest ``|W_ij|``. Needs no calibration data.

Structured: a unit's score is the l1 mass of everything that goes with it (its producer rows and
consumer columns).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice
from .base import PruneResult, PruningMethod
from .masks import prune_mask
from .structured import column_scores, row_scores


@dataclass
class MagnitudeOptions:
    #: "matrix": the smallest weights of the whole matrix go (the classic layer-wise baseline);
    #: "row": the same fraction from every output row.
    scope: str = "matrix"

    def __post_init__(self):
        check_choice(self.scope, "magnitude option scope", ("matrix", "row"))


class Magnitude(PruningMethod):
    name = "magnitude"
    Options = MagnitudeOptions
    supported_patterns = ("unstructured", "n:m", "structured")
    # |W| and the k-th value of the whole matrix (default scope; measured 5.5, benchmarks/workspace.py)
    workspace_copies = (0, 6)

    def prune_weight(self, weight, stats, target):
        mask = prune_mask(weight.abs(), target, scope=self.options.scope)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)

    def unit_scores(self, problem):
        return row_scores(problem) + column_scores(problem)
