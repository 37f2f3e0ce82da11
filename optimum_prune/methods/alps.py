"""ALPS (Meng et al., 2024): ADMM on the cardinality-constrained layer problem, then a PCG refit.

Per group of Linears sharing an input, in the coordinates where the damped Gram matrix has a unit
diagonal (``Wn = W diag(s)``, ``Hn = diag(s)^-1 H diag(s)^-1``, ``s = sqrt(diag H)``), so that the
projection's magnitude criterion is Wanda's ``|W_ij| ||X_j||`` and one ``rho`` suits every layer:

    minimise  tr((Wn - W') Hn (Wn - W')^T)   subject to  W' = D,  D in the sparsity pattern

    W' <- (Wn Hn + rho D - V) (Hn + rho I)^-1      a rescale in the eigenbasis of Hn (one eigh)
    D  <- top-k of |W' + V / rho| under the pattern (per row / per matrix / per N:M group)
    V  <- V + rho (W' - D)

``rho`` grows every ``update_every`` iterations, faster while the support still changes
(x1.3 / x1.2 / x1.1); the loop stops when the support has been stable for two checks or after
``max_iter``. The kept weights are then refitted by preconditioned conjugate gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import check_choice, check_int, check_positive_int, check_positive_number
from .base import GramSolverMethod
from .linalg import masked_least_squares, unit_diagonal
from ..patterns import Target
from .masks import stacked_prune_mask


@dataclass
class ALPSOptions:
    #: initial ADMM penalty, relative to the unit-diagonal Gram matrix
    rho0: float = 0.1
    #: ADMM iterations at most
    max_iter: int = 300
    #: iterations between rho updates / support-stability checks
    update_every: int = 3
    #: conjugate-gradient iterations of the final refit (0: no refit)
    pcg_iters: int = 10
    #: initial support: "wanda" (|W| ||X_j||) or "magnitude"
    warm_start: str = "wanda"
    #: unstructured budget per output "row" or per "matrix"
    scope: str = "row"
    #: precision of the eigendecomposition of H: "float64" (default) or "float32" (measured at
    #: 2048-4096 wide: 1.35-2x faster, 2.5 instead of 6.1 Gram-sized copies; SmolLM2-135M at 70%,
    #: three seeds: +2.0% / -0.5% in perplexity on two texts, worse on wiki every seed, so float64
    #: stays the default: docs/results/scaling.md)
    eigh_dtype: str = "float64"

    def __post_init__(self):
        check_positive_number(self.rho0, "alps option rho0")
        check_positive_int(self.max_iter, "alps option max_iter")
        check_positive_int(self.update_every, "alps option update_every")
        check_int(self.pcg_iters, "alps option pcg_iters", minimum=0)
        check_choice(self.warm_start, "alps option warm_start", ("wanda", "magnitude"))
        check_choice(self.scope, "alps option scope", ("row", "matrix"))
        check_choice(self.eigh_dtype, "alps option eigh_dtype", ("float64", "float32"))


@torch.no_grad()
def alps_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    target: Target,
    options: ALPSOptions,
    row_sizes: Sequence[int] | None = None,
    history: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (rows x cols, float32) for the damped Gram matrix ``H``; returns (weight, prune mask)."""
    Hn, Wn, s = unit_diagonal(H, W)
    evals, Q = torch.linalg.eigh(Hn.to(getattr(torch, options.eigh_dtype)))
    evals, Q = evals.clamp_min(0).to(W.dtype), Q.to(W.dtype)
    WHQ = (Wn @ Q) * evals  # Wn Hn Q, fixed

    def project(Z):
        return stacked_prune_mask(Z.abs(), target, row_sizes, scope=options.scope)

    prune = project(Wn if options.warm_start == "wanda" else W)
    D = Wn.masked_fill(prune, 0.0)
    V = torch.zeros_like(Wn)
    rho = float(options.rho0)
    budget = max(int(prune.sum()), 1)
    last, stable = prune, 0
    for it in range(1, options.max_iter + 1):
        Wp = (WHQ + (rho * D - V) @ Q).div_(evals + rho) @ Q.T
        Z = Wp + V / rho
        prune = project(Z)
        D = Z.masked_fill(prune, 0.0)
        V.add_(Wp - D, alpha=rho)
        if it % options.update_every == 0:
            changed = int((prune ^ last).sum())
            last = prune
            if history is not None:
                history.append({"iteration": it, "rho": rho, "support_changes": changed})
            stable = stable + 1 if changed == 0 else 0
            if stable >= 2:
                break
            fraction = changed / budget
            rho *= 1.3 if fraction > 0.1 else 1.2 if fraction > 0.005 else 1.1
    keep = ~prune
    if options.pcg_iters:
        D = masked_least_squares(Wn, Hn, keep, init=D, iters=options.pcg_iters)
    return (D / s.unsqueeze(0)).masked_fill_(prune, 0.0), prune


class ALPS(GramSolverMethod):
    name = "alps"
    Options = ALPSOptions
    # float64 eigendecomposition of H and its eigenvectors; W, W H Q, D, V, W', Z, the mask's
    # temporaries, the PCG vectors (measured: benchmarks/workspace.py, 6.1 / 14.5 at 1024-14336 wide;
    # with eigh_dtype="float32" 2.5 / 17.1: set in `__init__`)
    workspace_copies = (6, 15)

    #: ADMM iterations a solve typically runs before its support is stable: SmolLM2-135M's layer
    #: problems at 70% took 36-48, mean 43 (`benchmarks/iterations.py`); the time estimate counts
    #: this many (at most ``max_iter``), not the ``max_iter`` bound.
    typical_iterations = 45

    def solve_flops(self, rows: int, cols: int) -> float:
        """One eigendecomposition (float64 ~18 cols^3 at the float32 matmul rate, float32 ~13: measured
        10-16 at 2048-4096 wide), two products with the eigenbasis per ADMM iteration
        (`typical_iterations`) and the conjugate-gradient refit."""
        iterations = min(self.options.max_iter, self.typical_iterations)
        products = (4 * iterations + 2 * self.options.pcg_iters) * float(rows) * cols * cols
        eigh = 18.0 if self.options.eigh_dtype == "float64" else 13.0
        return eigh * float(cols) ** 3 + products

    def __init__(self, options=None, dampening: float = 0.01):
        super().__init__(options, dampening)
        if self.options.eigh_dtype == "float32":
            self.workspace_copies = (3, 17)  # measured 2.5 / 17.1 copies

    def solve(self, W, H, target, row_sizes):
        return alps_solve(W, H, target, self.options, row_sizes)
