"""SparseFW: Frank-Wolfe on the convex relaxation of the pruning mask.

The binary keep-mask ``M`` of a weight ``W`` (rows x cols) is relaxed to ``[0, 1]`` under the
pattern's budget (so many kept per row, per matrix, or per group of M inputs for N:M), and

    f(M) = tr(E H E^T),   E = W * (1 - M)          (the layer error of masking W, H the Gram matrix)

is minimised by Frank-Wolfe. ``grad f = -2 W * (E H)``; the linear minimisation oracle over the
relaxed budget set is a vertex: the budget's worth of the most negative gradient entries — the
same top-k-under-a-pattern that every mask in this package comes from (`masks.stacked_prune_mask`).
The step is exact line search (``f`` is quadratic along the segment, one closed form per row, or
per matrix for a per-matrix budget) or the classical ``2 / (t + 2)``. Each iteration costs one
product with ``H``: ``E H`` is updated, not recomputed. The duality gap ``<grad, M - S>`` bounds
``f(M) - f*``: the loop stops once it is below ``tol * f`` for every row (or matrix).

A fraction ``alpha`` of every budget is fixed to the top Wanda scores ``|W_ij| ||X_j||`` and FW
decides the rest (the first iterate is the Wanda mask itself). The relaxed mask is rounded to the
exact pattern (largest ``M`` kept), and the kept weights are optionally refitted by the shared
least-squares solver.

Structured variant: over the units of a channel group, the consumer's error of dropping units is
``f(m) = (1 - m)^T Q (1 - m)`` with ``Q = P^T ((W^T W) * H) P`` (``P`` sums the columns of a unit),
the same problem with one "row" of all-ones weights and ``Q`` for ``H``; refit = FASP's exact
least-squares restoration of the consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..patterns import SparsityPattern
from ..errors import PruningError, check_bool, check_choice, check_int, check_positive_int
from .base import SELECTION_OPS, GramSolverMethod
from .linalg import masked_least_squares
from ..patterns import Target
from .masks import budget, budget_groups, budget_totals, lowest_k_mask, stacked_prune_mask
from .structured import StructuredResult, restore_units

#: One Frank-Wolfe iteration's vertex (a k-th value per row) and element-wise work, operations per
#: weight at the matrix-multiply rate: fitted to 3-iteration solves of one decoder layer at 576-2048
#: wide on 2 CPU threads (benchmarks/scaling.py).
FW_STEP_OPS = 4300.0


@dataclass
class SparseFWOptions:
    #: Frank-Wolfe iterations at most
    iterations: int = 200
    #: stop once the duality gap (an upper bound on f - f*) is below tol * f, for every row
    tol: float = 0.01
    #: fraction of every keep budget fixed to the top Wanda scores (FW decides the rest)
    alpha: float = 0.9
    #: "line_search" (exact for this quadratic) or "standard" (2 / (t + 2))
    step: str = "line_search"
    #: least-squares refit of the kept weights after rounding (structured: restore the consumer)
    refit: bool = False
    #: conjugate-gradient iterations of the unstructured refit
    refit_iters: int = 20
    #: unstructured budget per output "row" or per "matrix"
    scope: str = "row"

    def __post_init__(self):
        check_positive_int(self.iterations, "sparsefw option iterations")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha < 1.0:
            raise PruningError(f"sparsefw option alpha must be a number in [0, 1) (0.9 is typical), got {self.alpha!r}.")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise PruningError(f"sparsefw option tol must be a non-negative number (0 runs every iteration), got {self.tol!r}.")
        check_choice(self.step, "sparsefw option step", ("line_search", "standard"))
        check_bool(self.refit, "sparsefw option refit")
        check_int(self.refit_iters, "sparsefw option refit_iters", minimum=0)
        check_choice(self.scope, "sparsefw option scope", ("row", "matrix"))


def fixed_keep_mask(scores: torch.Tensor, target: Target, alpha: float, row_sizes, scope: str) -> torch.Tensor:
    """``floor(alpha * kept)`` highest ``scores`` of every budget (row, matrix, or N:M group)."""
    rows, cols = scores.shape
    if target.is_nm:
        n, m = target.pattern.n, target.pattern.m
        grouped = -scores.reshape(rows, cols // m, m)
        return lowest_k_mask(grouped, int(alpha * n), dim=2).reshape(rows, cols)
    if scope == "row":
        return lowest_k_mask(-scores, int(alpha * (cols - budget(cols, target.sparsity))), dim=1)
    parts = []
    for part in scores.split(list(row_sizes) if row_sizes is not None else [rows], 0):
        flat = -part.reshape(-1)
        parts.append(lowest_k_mask(flat, int(alpha * (flat.numel() - budget(flat.numel(), target.sparsity))), 0)
                     .reshape(part.shape))
    return torch.cat(parts, 0)


@torch.no_grad()
def frank_wolfe_mask(
    W: torch.Tensor,
    H: torch.Tensor,
    target: Target,
    scores: torch.Tensor,
    options: SparseFWOptions,
    row_sizes: Sequence[int] | None = None,
    history: list | None = None,
) -> torch.Tensor:
    """The relaxed keep-mask (float, in [0, 1], the pattern's budget) after ``options.iterations``
    Frank-Wolfe steps from the mask of the top ``scores``; ``history`` gets objective and gap."""
    fixed = fixed_keep_mask(scores, target, options.alpha, row_sizes, options.scope)
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=W.device)

    def vertex(priority):  # keep the budget's highest priorities, the fixed entries always
        return (~stacked_prune_mask(torch.where(fixed, inf, priority), target, row_sizes, options.scope)).to(W.dtype)

    groups = budget_groups(W.shape[0], target, options.scope, row_sizes)
    M = vertex(scores)
    EH = (W * (1.0 - M)) @ H
    for t in range(options.iterations):
        if t and t % 50 == 0:  # refresh the running product against drift
            EH = (W * (1.0 - M)) @ H
        G = -2.0 * W * EH
        S = vertex(-G)
        D = S - M
        gap = (G * (M - S)).sum(1)
        objective = ((W * (1.0 - M)) * EH).sum(1)
        if history is not None:
            history.append({"iteration": t, "objective": float(objective.sum()), "gap": float(gap.sum())})
        if bool((budget_totals(gap, groups) <= options.tol * budget_totals(objective, groups)).all()):
            break
        A = W * D
        AH = A @ H
        if options.step == "line_search":
            num = budget_totals((A * EH).sum(1), groups)
            den = budget_totals((A * AH).sum(1), groups)
            gamma = torch.where(den > 0, num / den.clamp_min(torch.finfo(W.dtype).tiny), torch.zeros_like(den))
            gamma = gamma.clamp_(0.0, 1.0).unsqueeze(1)
        else:
            gamma = 2.0 / (t + 2.0)
        M.add_(gamma * D)
        EH.sub_(gamma * AH)
    return M


def round_mask(M: torch.Tensor, scores: torch.Tensor, target: Target, row_sizes, scope: str) -> torch.Tensor:
    """Prune mask of the relaxed ``M`` rounded to the exact pattern: lowest ``M`` pruned, ties by ``scores``."""
    tie = scores / scores.amax(1, keepdim=True).clamp_min(1e-30)
    return stacked_prune_mask(M + 1e-6 * tie, target, row_sizes, scope)


@torch.no_grad()
def sparsefw_solve(W, H, target, options: SparseFWOptions, row_sizes=None, input_norm=None, history=None):
    """Prune ``W`` for the damped Gram matrix ``H``: returns (weight, prune mask)."""
    norm = input_norm if input_norm is not None else torch.diagonal(H).clamp_min(0).sqrt()
    scores = W.abs() * norm.to(W).unsqueeze(0)
    M = frank_wolfe_mask(W, H, target, scores, options, row_sizes, history)
    prune = round_mask(M, scores, target, row_sizes, options.scope)
    if options.refit:
        W = masked_least_squares(W, H, ~prune, iters=options.refit_iters)
    return W.masked_fill(prune, 0.0), prune


class SparseFW(GramSolverMethod):
    name = "sparsefw"
    Options = SparseFWOptions
    # relaxed mask, gradient, E H, vertex, rounding (measured: benchmarks/workspace.py, 3.7 / 12.9)
    workspace_copies = (4, 13)

    #: Frank-Wolfe iterations a solve typically runs before the duality gap is below ``tol``:
    #: SmolLM2-135M's layer problems at 70% took 19-128, mean 52 (`benchmarks/iterations.py`);
    #: the time estimate counts this many (at most ``iterations``) when ``tol`` is set.
    typical_iterations = 55

    def solve_flops(self, rows: int, cols: int) -> float:
        """The first ``E H`` product, three selections (the fixed entries, the first vertex, the
        rounding); per Frank-Wolfe iteration one product with H and a vertex with its element-wise
        work (fitted: `FW_STEP_OPS` per weight); the refit's products when it is on. One layer 576-2048
        wide: estimate / measured 0.74-1.12 at a fixed iteration count; the full solves of random
        layers ran up to the 200-iteration bound (at 1024 wide: 317 s counted at 200, 306 s measured)."""
        o = self.options
        iterations = min(o.iterations, self.typical_iterations) if o.tol > 0 else o.iterations
        refit = 2.0 * (o.refit_iters + 1) * rows * cols * cols if o.refit else 0.0
        return (2.0 * rows * cols * cols + 3 * SELECTION_OPS * rows * cols + refit
                + iterations * (2.0 * rows * cols * cols + FW_STEP_OPS * rows * cols))

    supported_patterns = ("unstructured", "n:m", "structured")

    def solve(self, W, H, target, row_sizes):
        # Wanda's norms are those of the undamped Gram matrix: undo the uniform diagonal shift
        diag = torch.diagonal(H)
        undamped = (diag - self.dampening / (1.0 + self.dampening) * diag.mean()).clamp_min(0)
        return sparsefw_solve(W, H, target, self.options, row_sizes, input_norm=undamped.sqrt())

    # ------------------------------------------------------------------ structured
    producer_statistics = frozenset()  # the relaxation and the restoration look at the consumer only

    def prune_structured(self, problem, remove):
        units, per = problem.units, problem.cols_per_unit
        W = problem.consumer
        gram = problem.consumer_stats.gram.to(W)
        Q = ((W.T @ W) * gram).reshape(units, per, units, per).sum((1, 3))
        target = Target(remove / units, SparsityPattern("unstructured"))
        ones = torch.ones(1, units, dtype=W.dtype, device=W.device)
        scores = torch.diagonal(Q).clamp_min(0).sqrt().unsqueeze(0)  # error of removing one unit alone
        M = frank_wolfe_mask(ones, Q, target, scores, self.options)
        prune = round_mask(M, scores, target, None, "row")[0]
        keep = torch.nonzero(~prune).flatten()
        return StructuredResult(keep, restore_units(problem, keep, self.dampening) if self.options.refit else None)
