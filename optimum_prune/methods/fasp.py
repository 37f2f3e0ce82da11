"""FASP (fast and accurate structured pruning): interlinked channels, Wanda-like score, restoration.

Unit ``j`` of a channel group is removed everywhere at once (its producer rows and consumer
columns). The score looks only at the consumer: ``||Z_j|| * sum_i |W_ij|`` with ``Z`` the
consumer's input, i.e. how much the consumer's output depends on that channel. Restoration then
re-fits the consumer on the kept channels by least squares against the dense output:
``W~ = W H[:, S] H[S, S]^-1`` with ``H`` the Gram matrix of ``Z`` (`linalg.restore_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PruningError, check_positive_number
from .base import PruningMethod
from .structured import LeastSquaresRestore, column_scores


@dataclass
class FASPOptions:
    #: Re-fit the consuming matrix (down_proj / o_proj / fc2) on the kept channels by least squares.
    restore: bool = True
    #: None: every consumer re-fitted. A ratio (e.g. 1.0): a re-fit whose Frobenius norm exceeds this
    #: many times the dense consumer's is dropped and the kept columns stay as they are.
    max_restore_growth: float | None = None

    def __post_init__(self):
        if not isinstance(self.restore, bool):
            raise PruningError(f"fasp option restore must be true or false, got {self.restore!r}.")
        if self.max_restore_growth is not None:
            check_positive_number(self.max_restore_growth, "fasp option max_restore_growth")


class FASP(LeastSquaresRestore, PruningMethod):
    name = "fasp"
    # the consumer's Gram matrix and its kept block's factor; the consumer weight, its restored
    # columns and products (fitted to benchmarks/scaling.py's 2048 and 4096 rows)
    workspace_copies = (2, 4)
    Options = FASPOptions
    supported_patterns = ("structured",)

    @property
    def statistics(self):
        return frozenset({"gram"}) if self.options.restore else frozenset({"sq_norm"})

    producer_statistics = frozenset()  # the score and the restoration look at the consumer only

    def unit_scores(self, problem):
        return column_scores(problem, problem.consumer_stats.input_norm)

