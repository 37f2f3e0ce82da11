"""Wanda-sp: Wanda's ``|W| * ||input||`` score summed over a whole structural unit.

The structured baseline of the FLAP / LLM-Pruner comparisons: a unit (MLP channel, KV group) is
scored by the Wanda scores of all its weights, the producer rows (against the layer input's norms)
and the consumer columns (against the intermediate activation's norms). No weight update.
"""

from __future__ import annotations

from .base import PruningMethod
from .structured import column_scores, row_scores


def wanda_sp_scores(problem):
    """Wanda scores summed over each unit's producer rows and consumer columns."""
    return row_scores(problem, problem.producer_stats.input_norm) + column_scores(
        problem, problem.consumer_stats.input_norm
    )


class WandaSP(PruningMethod):
    name = "wanda-sp"
    supported_patterns = ("structured",)
    statistics = frozenset({"sq_norm"})

    def unit_scores(self, problem):
        return wanda_sp_scores(problem)
