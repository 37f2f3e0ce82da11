"""Shared numerical helpers for the solvers: damping, dead inputs, robust Cholesky."""

from __future__ import annotations

import logging

import torch


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
    raise FloatingPointError(
        f"{what} stays singular after damping; increase `dampening` or use more calibration samples."
    )


def inverse_cholesky_upper(H: torch.Tensor, what: str = "Gram matrix") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), as SparseGPT/OBS updates use it."""
    L = robust_cholesky(H, what)
    Hinv = torch.cholesky_inverse(L)
    return robust_cholesky(Hinv, f"inverse of the {what}").T.contiguous()
