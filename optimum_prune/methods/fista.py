"""FISTAPruner (Zhao et al., 2024): a convex l1 model per Linear, solved by FISTA, then rounded.

For Linears sharing an input (stacked as one tall ``W``) and the damped Gram matrix ``H`` of that
input, each output row ``i`` solves

    min_Z  1/2 (Z_i - W_i) H (Z_i - W_i)^T + lambda_i ||Z_i D||_1

with FISTA (gradient step ``1/L``, ``L = lambda_max(H)``, soft-thresholding, Nesterov momentum).
``D`` is the identity (``weighted_l1=False``: the paper's plain l1) or ``diag(sqrt(H_jj))``
(default): the l1 weight of an input is its calibration norm, the Wanda weighting, and FISTA then
runs in the coordinates where ``H`` has a unit diagonal (a Jacobi preconditioning that makes the
few large-activation inputs of an LLM stop dictating the step size).

``lambda_i`` is found per row by bisection (geometric, between ``1e-4`` and ``1`` times the value
that zeroes the row): more zeros than the target sparsity -> smaller lambda, fewer -> larger; each
round restarts FISTA from the best rounded candidate so far (the warm start at first). Every
round's solution is rounded to the exact pattern (largest ``|Z_ij D_jj|`` kept per row / per matrix / per N:M group), its kept weights
refitted by the shared least-squares solver, and scored by the layer objective; each row (or each
matrix, for a per-matrix budget) keeps its best candidate, the warm start (SparseGPT or Wanda)
included.

Intra-layer error correction (``error_correction=True``, default) is the engine's: it prunes a
layer's Linears in call order and hands later Linears paired statistics, so that the ``W`` and ``H``
above are the corrected target and the Gram matrix of the inputs of the partly pruned layer
(`~optimum_prune.methods.linalg.corrected_target`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import check_bool, check_choice, check_int, check_positive_int
from .base import SELECTION_OPS, GramSolverMethod
from .linalg import inverse_cholesky_upper, layer_objective, masked_least_squares, unit_diagonal
from ..patterns import Target
from .masks import budget_groups, budget_totals, stacked_prune_mask
from .sparsegpt import sparsegpt_solve

#: One FISTA iteration's element-wise work (gradient step, soft threshold, momentum), operations per
#: weight at the matrix-multiply rate: fitted to the full FISTA solves of one decoder layer at 576
#: and 1024 wide on 2 CPU threads (benchmarks/scaling.py).
FISTA_STEP_OPS = 2300.0


@dataclass
class FISTAOptions:
    #: FISTA iterations per lambda (each round restarts from the best rounded candidate so far)
    iterations: int = 20
    #: lambda bisection rounds (every round's rounded solution is a candidate)
    rounds: int = 4
    #: initial point and first candidate: "sparsegpt" or "wanda"
    warm_start: str = "sparsegpt"
    #: fit later Linears of a layer on the inputs of the partly pruned layer (engine feature)
    error_correction: bool = True
    #: l1 weighted by the input norms (FISTA in unit-diagonal coordinates); False: plain l1
    weighted_l1: bool = True
    #: conjugate-gradient iterations refitting each rounded candidate on its support (0: none)
    refit_iters: int = 8
    #: unstructured budget per output "row" or per "matrix"
    scope: str = "row"

    def __post_init__(self):
        check_positive_int(self.iterations, "fista option iterations")
        check_positive_int(self.rounds, "fista option rounds")
        check_choice(self.warm_start, "fista option warm_start", ("sparsegpt", "wanda"))
        check_bool(self.error_correction, "fista option error_correction")
        check_bool(self.weighted_l1, "fista option weighted_l1")
        check_int(self.refit_iters, "fista option refit_iters", minimum=0)
        check_choice(self.scope, "fista option scope", ("row", "matrix"))


def soft_threshold(Z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return Z.sign() * (Z.abs() - threshold).clamp_min_(0.0)


@torch.no_grad()
def accelerated_proximal(start: torch.Tensor, Hn: torch.Tensor, WnHn: torch.Tensor, L: float,
                         threshold: torch.Tensor, iterations: int) -> torch.Tensor:
    """FISTA's accelerated proximal-gradient iterations for ``min 1/2 tr(Z Hn Z^T) - tr(Z (Wn Hn)^T)
    + threshold * L * |Z|_1`` (step ``1/L``) from ``start``, rows in parallel."""
    Z = start.clone()
    Y, t = Z.clone(), 1.0
    for _ in range(iterations):
        Z_next = soft_threshold(Y - (Y @ Hn - WnHn) / L, threshold)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        Y = Z_next + ((t - 1.0) / t_next) * (Z_next - Z)
        Z, t = Z_next, t_next
    return Z


def warm_start(W: torch.Tensor, H: torch.Tensor, Wn: torch.Tensor, s: torch.Tensor, target: Target,
               options: FISTAOptions, row_sizes: Sequence[int] | None) -> torch.Tensor:
    """FISTA's starting point in unit-diagonal coordinates: SparseGPT's solution, or ``Wn`` itself."""
    if options.warm_start != "sparsegpt":
        return Wn
    start, _ = sparsegpt_solve(W.clone(), inverse_cholesky_upper(H), target, row_sizes=row_sizes)
    return start * s.unsqueeze(0)


def fista_solve(W: torch.Tensor, H: torch.Tensor, target: Target, options: FISTAOptions,
                row_sizes: Sequence[int] | None = None, history: list | None = None,
                rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (rows x cols, float32) for the damped Gram matrix ``H``; returns (weight, prune mask).

    ``rows`` (start, stop): only those rows of the result, the same numbers as the whole solve's when
    every row has its own budget (`FISTAPruner.separable_rows`): the start is computed for all rows
    (SparseGPT balances its budget over a block's rows), everything after it row by row.

    ``history`` (optional) receives one dict per round: the natural sparsity of the l1 solution,
    the total objective of the rounded candidate and of the best so far, and how many rows improved.
    """
    Hn, Wn, s = unit_diagonal(H, W, None if options.weighted_l1 else torch.ones_like(W[0]))
    L = float(torch.linalg.eigvalsh(Hn.double())[-1].clamp_min(1e-12))
    natural_target = target.pattern.implied_sparsity if target.is_nm else target.sparsity

    def candidate_error(Z):  # every row carries the error of the rows sharing its budget
        return budget_totals(layer_objective(Z, Hn, Wn), groups)

    def round_and_refit(Z):
        prune = stacked_prune_mask(Z.abs(), target, row_sizes, scope=options.scope)
        Z = Z.masked_fill(prune, 0.0)
        if options.refit_iters:
            Z = masked_least_squares(Wn, Hn, ~prune, init=Z, iters=options.refit_iters).masked_fill_(prune, 0.0)
        return Z, prune

    start = warm_start(W, H, Wn, s, target, options, row_sizes)  # the first candidate and FISTA's start
    if rows is not None:  # a block of rows alone (each row its own budget)
        start, Wn = start[rows[0]:rows[1]], Wn[rows[0]:rows[1]]
        row_sizes = None
    WnHn = Wn @ Hn
    groups = budget_groups(Wn.shape[0], target, options.scope, row_sizes)
    # re-rounded to this method's own budget scope (SparseGPT balances its budget per matrix)
    best, best_prune = round_and_refit(start)
    best_err = candidate_error(best)

    # lambda bounds per row: above max|grad at 0| = max|(Wn Hn)_ij| the solution is zero
    hi = WnHn.abs().amax(1, keepdim=True).clamp_min(1e-12)
    log_lo, log_hi = torch.log(hi * 1e-4), torch.log(hi)
    for rnd in range(options.rounds):
        lam = torch.exp((log_lo + log_hi) / 2)
        threshold = lam / L
        Z = accelerated_proximal(best, Hn, WnHn, L, threshold, options.iterations)  # from the best candidate so far
        natural = (Z == 0).float().mean(1, keepdim=True)
        too_sparse = natural > natural_target
        log_hi = torch.where(too_sparse, torch.log(lam), log_hi)
        log_lo = torch.where(too_sparse, log_lo, torch.log(lam))
        cand, cand_prune = round_and_refit(Z)
        err = candidate_error(cand)
        better = err < best_err
        best = torch.where(better.unsqueeze(1), cand, best)
        best_prune = torch.where(better.unsqueeze(1), cand_prune, best_prune)
        best_err = torch.minimum(err, best_err)
        if history is not None:
            history.append({"round": rnd, "natural_sparsity": float(natural.mean()),
                            "candidate_error": float(layer_objective(cand, Hn, Wn).sum()),
                            "best_error": float(layer_objective(best, Hn, Wn).sum()), "rows_improved": int(better.sum())})
    return (best / s.unsqueeze(0)).masked_fill_(best_prune, 0.0), best_prune


class FISTAPruner(GramSolverMethod):
    name = "fista"
    Options = FISTAOptions
    # FISTA iterates, momentum, best candidates, CG refit (measured: benchmarks/workspace.py, 2.4 / 17.4)
    workspace_copies = (3, 17)

    def solve_flops(self, rows: int, cols: int) -> float:
        """The SparseGPT start, the float64 largest eigenvalue (~5 cols^3 at the float32 rate),
        ``Wn Hn``; per lambda round one product with H and an element-wise update (fitted:
        `FISTA_STEP_OPS` per weight) per FISTA iteration; for every candidate (the start's and one per
        round) a selection, the conjugate-gradient refit (a product per iteration) and its layer
        error (one more). Estimate / measured 0.78-1.09 on one layer 576-1024 wide, 0.64-1.30 cut to
        one round of two iterations at 576-4096."""
        o = self.options
        per_candidate = 2.0 * (o.refit_iters + 1) * rows * cols * cols + SELECTION_OPS * rows * cols
        per_iteration = 2.0 * rows * cols * cols + FISTA_STEP_OPS * rows * cols
        return (super().solve_flops(rows, cols) + 5.0 * float(cols) ** 3 + 2.0 * rows * cols * cols
                + (o.rounds + 1) * per_candidate + o.rounds * o.iterations * per_iteration)

    @property
    def error_correction(self) -> bool:
        return self.options.error_correction

    def separable_rows(self, target) -> bool:
        """Every row has its own budget (per-row scope, N:M), bisection and refit: a block of rows is
        solved alone with the same numbers (the SparseGPT start is computed whole)."""
        return self.options.scope == "row" or target.is_nm

    def solve(self, W, H, target, row_sizes):
        return fista_solve(W, H, target, self.options, row_sizes)

    def solve_rows(self, W, H, target, row_sizes, start, stop):
        if not self.separable_rows(target):
            raise NotImplementedError("fista with scope='matrix' does not prune a block of rows alone.")
        return fista_solve(W, H, target, self.options, row_sizes, rows=(start, stop))
