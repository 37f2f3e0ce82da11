"""SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning column by column.

With ``U`` the upper Cholesky factor of ``H^-1`` (H the damped Gram matrix of the inputs), columns
are visited left to right in blocks. Inside a block the mask is chosen by the saliency
``w^2 / U_jj^2`` (per block over the rows of each matrix for unstructured targets, per group of M
columns for N:M); each removed weight's error is spread over the not-yet-visited columns of its
row through ``U``, and the block's accumulated error is pushed to the later blocks in one matmul.

Rows are independent given ``U``, so Linears that read the same input (q/k/v, gate/up) are solved
together as one tall matrix, with their masks still chosen per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import check_positive_int
from .base import GramSolverMethod
from .linalg import inverse_cholesky_upper
from ..patterns import Target
from .masks import nm_prune_mask, stacked_prune_mask


@dataclass
class SparseGPTOptions:
    #: columns per block (lazy batch updates); a multiple of M is used for N:M patterns.
    blocksize: int = 128

    def __post_init__(self):
        check_positive_int(self.blocksize, "sparsegpt option blocksize")


@torch.no_grad()
def sparsegpt_solve(
    W: torch.Tensor, U: torch.Tensor, target: Target, blocksize: int = 128, row_sizes: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (rows x cols, float32, modified in place) given ``U`` = upper Cholesky of ``H^-1``.

    Returns ``(W, mask)`` with ``mask`` True where pruned and ``W[mask] == 0``.
    """
    rows, cols = W.shape
    row_sizes = list(row_sizes) if row_sizes is not None else [rows]
    nm = target.pattern if target.is_nm else None
    if nm is not None:
        blocksize = max(nm.m, blocksize - blocksize % nm.m)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        if nm is None:
            M1 = stacked_prune_mask(W1.square() / d.square(), target, row_sizes)
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                group = slice(i, i + nm.m)
                M1[:, group] = nm_prune_mask(W1[:, group].square() / d[group].square(), nm.n, nm.m)
            # error of removing the masked entries of column i, spread over the columns to its right
            e = W1[:, i].mul(M1[:, i]).div_(d[i])
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
            err[:, i] = e
        W1.masked_fill_(M1, 0.0)
        W[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        if i2 < cols:
            W[:, i2:].sub_(err @ U[i1:i2, i2:])
    return W, mask


class SparseGPT(GramSolverMethod):
    name = "sparsegpt"
    workspace_copies = (3, 3)  # H, its inverse factor and a block; W, its updates (measured 2.9 / 3.0)
    Options = SparseGPTOptions

    def solve(self, W, H, target, row_sizes):
        return sparsegpt_solve(W, inverse_cholesky_upper(H), target, self.options.blocksize, row_sizes)
