"""SPAP (Hu & Yuan, 2025): structured pruning as a mixed-integer problem, solved by a penalty
method and alternating minimisation.

For one channel group, with ``W`` the consumer's weight (out x n columns, ``cols_per_unit``
columns per unit) and ``H`` the damped Gram matrix of its input, the layer problem is

    min_{W', s}  tr((W - W') H (W - W')^T)   s.t. s in {0,1}^units, sum s = k,
                                                  W'[:, c] = 0 for the columns of units with s = 0.

The hard coupling is replaced by a penalty on the columns of dropped units (in the coordinates
where ``H`` has a unit diagonal, so that ``mu`` means the same in every layer):

    F_mu(W', s) = tr((W - W') H (W - W')^T) + mu * sum_c (1 - s_c) ||W'[:, c]||^2

and the two blocks are minimised alternately while ``mu`` grows and the number of dropped units
ramps up to the budget over ``steps`` alternations:

- weight step (closed form; the problem splits per row, and one Cholesky factor of the penalised
  matrix ``M = H + mu diag(1 - s)`` serves every row): ``W' = W H M^-1``;
- selection step: keep the units whose removal would cost most given the current weights, the
  optimal-brain-surgeon cost under the penalised problem, ``sum_{c in unit} ||W'[:, c]||^2 / [M^-1]_cc``
  (the exact increase of the quadratic when one column is forced to zero and the others adapt).

At the final budget the alternations go on for ``polish`` more steps; each selection is scored by
its exact layer error (least-squares re-fit of the consumer on the kept columns,
`linalg.restore_columns`) and the best one is kept, so the reported objective never increases.
The initial selection (FASP's scores, or Wanda-sp's) is one of the candidates: the result is
never worse than it. ``history`` lists every alternation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PruningError, check_choice, check_int, check_positive_number
from .base import PruningMethod
from .linalg import prepare_hessian, robust_cholesky
from ..structure.groups import unit_indices
from .structured import StructuredResult, column_scores, keep_top, per_unit, restore_units
from .wanda_sp import wanda_sp_scores


@dataclass
class SPAPOptions:
    #: Selection compared against (and returned if no alternation beats it): "fasp" or "wanda-sp" scores.
    init: str = "fasp"
    #: Penalty weight at the first alternation (unit-diagonal coordinates) and its growth per alternation.
    mu0: float = 0.01
    growth: float = 1.5
    #: Alternations while the number of dropped units ramps up to the budget, then at the budget.
    steps: int = 16
    polish: int = 4

    def __post_init__(self):
        check_choice(self.init, "spap option init", ("fasp", "wanda-sp"))
        check_positive_number(self.mu0, "spap option mu0")
        check_positive_number(self.growth, "spap option growth")
        if self.growth <= 1:
            raise PruningError(f"spap option growth must be > 1 (the penalty must grow), got {self.growth!r}.")
        check_int(self.steps, "spap option steps", 1)
        check_int(self.polish, "spap option polish", 0)


def layer_error(W: torch.Tensor, H: torch.Tensor, X: torch.Tensor, cols: torch.Tensor) -> float:
    """``tr((W - X~) H (W - X~)^T)`` where ``X~`` is ``X`` placed on columns ``cols`` (zeros elsewhere)."""
    D = W.clone()
    D[:, cols] -= X
    return float(((D @ H) * D).sum())


class SPAP(PruningMethod):
    name = "spap"
    Options = SPAPOptions
    # H, Hn, the penalised M, its factor and its inverse; W, Wn, H W^T, the weight step and its
    # square, the restored consumer and the best one so far
    workspace_copies = (5, 7)

    def solve_flops(self, rows: int, cols: int) -> float:
        """Per alternation (and once before them) a Cholesky factor of the penalised Gram matrix, the
        inverse's diagonal from it (~4/3 cols^3 together) and the weight step (2 rows cols^2); at the
        final budget, and for the initial selection, each selection's exact error: the least-squares
        refit (cols^3 / 3 + 2 rows cols^2) and its layer error (2 rows cols^2). Estimate / measured
        0.59-0.95 at 576-1024 wide, 0.80 at 4096 cut to 3 alternations (one layer,
        benchmarks/scaling.py; the matmul rate's short sample is the noisy part)."""
        o = self.options
        c3, rc2 = float(cols) ** 3, float(rows) * cols * cols
        return (o.steps + o.polish + 1) * (4.0 / 3.0 * c3 + 2.0 * rc2) + (o.polish + 2) * (c3 / 3.0 + 4.0 * rc2)
    supported_patterns = ("structured",)

    def __init__(self, options=None, dampening: float = 0.01):
        super().__init__(options, dampening)
        #: the last group solved: per alternation {"step", "mu", "removed"}, plus at the final budget
        #: "objective" (exact layer error of that selection) and "best" (lowest so far, init included)
        self.history: list[dict] = []

    def unit_scores(self, problem):
        if self.options.init == "wanda-sp":
            return wanda_sp_scores(problem)
        return column_scores(problem, problem.consumer_stats.input_norm)

    statistics = frozenset({"gram"})

    @property
    def producer_statistics(self):  # wanda-sp initialisation also needs the layer input's norms
        return frozenset({"sq_norm"}) if self.options.init == "wanda-sp" else frozenset()

    def _exact(self, problem, keep, W, H):
        X = restore_units(problem, keep, self.dampening)
        return layer_error(W, H, X, unit_indices(keep, problem.cols_per_unit).to(W.device)), X

    @torch.no_grad()
    def prune_structured(self, problem, remove):
        opts = self.options
        per = problem.cols_per_unit
        H, W = prepare_hessian(problem.consumer_stats.gram, problem.consumer, self.dampening)
        scale = torch.diagonal(H).sqrt()
        Hn = H / scale[:, None] / scale[None, :]
        Wn = W * scale[None, :]
        HWt = Hn @ Wn.T  # n x out: right-hand side of every weight step

        init_keep = keep_top(self.unit_scores(problem), remove)
        best_error, best_X = self._exact(problem, init_keep, W, H)
        best_keep = init_keep
        history = [{"step": 0, "removed": remove, "objective": best_error, "best": best_error, "selection": "init"}]
        Xn = Wn  # no unit dropped yet: the weight step's solution is W itself
        Minv_diag = torch.diagonal(torch.cholesky_inverse(robust_cholesky(Hn, "Gram matrix")))
        mu = opts.mu0
        for step in range(1, opts.steps + opts.polish + 1):
            removed = math.ceil(remove * min(step, opts.steps) / opts.steps)
            cost = per_unit((Xn * Xn).sum(0) / Minv_diag, per)  # selection step
            keep = keep_top(cost, removed)
            dropped = torch.ones(problem.units, dtype=Hn.dtype, device=Hn.device)
            dropped[keep] = 0
            M = Hn.clone()
            M.diagonal().add_(mu * dropped.repeat_interleave(per))  # no second n x n matrix for the penalty
            L = robust_cholesky(M, "penalised Gram matrix")
            Xn = torch.cholesky_solve(HWt, L).T  # weight step, every row at once
            Minv_diag = torch.diagonal(torch.cholesky_inverse(L))
            entry = {"step": step, "mu": mu, "removed": removed}
            if removed == remove:
                error, X = self._exact(problem, keep, W, H)
                if error < best_error:
                    best_error, best_keep, best_X = error, keep, X
                entry.update(objective=error, best=best_error)
            history.append(entry)
            mu *= opts.growth
        self.history = history
        return StructuredResult(best_keep, best_X)
