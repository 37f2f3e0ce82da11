"""Shared numerical helpers for the solvers: damping, dead inputs, robust Cholesky."""

from __future__ import annotations

import logging

import torch

from ..errors import PruningError


logger = logging.getLogger(__name__)


def prepare_hessian(gram: torch.Tensor, weight: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped copy of the Gram matrix ``H`` (in x in) and the weight with dead inputs zeroed.

    Inputs never seen with a non-zero value get ``H_ii = 1`` and ``W[:, i] = 0``; then
    ``H += dampening * mean(diag H) * I``. Both returned tensors are float32 copies.
    """
    H = gram.to(torch.float32).clone()
    W = weight.to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    diag = torch.diagonal(H)
    diag += dampening * diag.mean()
    return H, W


def layer_objective(W: torch.Tensor, H: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row ``(W_i - T_i) H (W_i - T_i)^T``: the reconstruction error of every output row."""
    D = W - target
    return ((D @ H) * D).sum(1)


def corrected_target(stats, weight: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Gram matrix ``H*`` of the pruned-path inputs and the target re-expressed on them.

    With intra-layer error correction a Linear sees ``X*`` (inputs after the Linears before it in
    the layer were pruned) but must reproduce ``W X`` (the dense layer). Since
    ``||W' X* - W X||^2 = ||(W' - W~) X*||^2 + const`` with ``W~ = W C H*^-1`` (``C = X^T X* / n``,
    the least-squares fit of the dense output on ``X*``), every solver of
    ``min tr((W' - W) H (W' - W)^T)`` handles the corrected problem when given ``(H*, W~)``.
    Without paired statistics this is `prepare_hessian`.
    """
    if getattr(stats, "cross", None) is None:
        return prepare_hessian(stats.gram, weight, dampening)
    H, _ = prepare_hessian(stats.gram, weight, dampening)
    B = weight.to(torch.float32) @ stats.cross.to(torch.float32)
    L = robust_cholesky(H, "Gram matrix of the corrected inputs")
    return H, torch.cholesky_solve(B.T.contiguous(), L).T.contiguous()


def robust_cholesky(H: torch.Tensor, what: str = "Gram matrix", max_tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of ``H``; on failure adds escalating damping (x10 each try) and warns."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L
    extra = 1e-6 * float(torch.diagonal(H).abs().mean().clamp_min(1e-12))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            logger.warning("%s was not positive definite; added %.3g to its diagonal.", what, extra)
            return L
        extra *= 10.0
    raise PruningError(
        f"{what} stays singular after damping; raise dampening (--dampening) or use more calibration samples."
    )


def inverse_cholesky_upper(H: torch.Tensor, what: str = "Gram matrix") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), as SparseGPT/OBS updates use it."""
    L = robust_cholesky(H, what)
    Hinv = torch.cholesky_inverse(L)
    return robust_cholesky(Hinv, f"inverse of the {what}").T.contiguous()


@torch.no_grad()
def masked_least_squares(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    init: torch.Tensor | None = None,
    iters: int = 10,
) -> torch.Tensor:
    """Refit the kept weights: ``min_X tr((W - X) H (W - X)^T)`` with ``X`` zero outside ``keep``.

    Rows are independent least-squares problems restricted to their own support; all rows are
    solved at once by conjugate gradients with the Jacobi (diagonal of ``H``) preconditioner,
    starting from ``init`` (default: ``W`` masked). ``H`` should be damped (positive definite).
    This is the one refit helper the methods share.
    """
    keep_f = keep.to(W.dtype)
    X = (init if init is not None else W).mul(keep_f)
    inv_diag = 1.0 / torch.diagonal(H).clamp_min(1e-12)
    r = (W - X) @ H * keep_f  # minus half the gradient, on the support
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    tiny = torch.finfo(W.dtype).tiny
    for _ in range(iters):
        Ap = (p @ H) * keep_f
        pAp = (p * Ap).sum(1, keepdim=True)
        alpha = torch.where(pAp > tiny, rz / pAp.clamp_min(tiny), torch.zeros_like(pAp))
        X.add_(alpha * p)
        r.sub_(alpha * Ap)
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return X


@torch.no_grad()
def restore_columns(W: torch.Tensor, gram: torch.Tensor, keep_cols: torch.Tensor, dampening: float) -> torch.Tensor:
    """Least-squares re-fit of a consumer after its input columns outside ``keep_cols`` are removed.

    ``min_X ||X Z_S - W Z||^2`` over the calibration inputs ``Z`` gives ``X = W H[:, S] H[S, S]^-1``
    with ``H = Z Z^T / n`` (damped as everywhere else, which shrinks ``X`` towards ``W[:, S]``).
    Every row shares the support, so one Cholesky factor serves all rows: exact, not iterative.
    """
    H, W = prepare_hessian(gram, W, dampening)
    keep_cols = keep_cols.to(device=H.device, dtype=torch.long)
    L = robust_cholesky(H.index_select(0, keep_cols).index_select(1, keep_cols), "Gram matrix of the kept inputs")
    rhs = (W @ H.index_select(1, keep_cols)).T  # |S| x out
    return torch.cholesky_solve(rhs, L).T.contiguous()


def unit_diagonal(H: torch.Tensor, W: torch.Tensor, s: torch.Tensor | None = None):
    """The problem in the coordinates where ``H`` has a unit diagonal: ``Hn = diag(s)^-1 H diag(s)^-1``,
    ``Wn = W diag(s)`` with ``s = sqrt(diag H)`` (or the given ``s``); returns ``(Hn, Wn, s)``.
    A weight ``Zn`` found there is ``Zn / s`` in the original coordinates."""
    if s is None:
        s = torch.diagonal(H).clamp_min(1e-12).sqrt()
    return H / s.unsqueeze(0) / s.unsqueeze(1), W * s.unsqueeze(0), s
