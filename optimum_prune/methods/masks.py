"""The one place where scores become masks, for every pattern a method can be asked for.

Convention: a *prune mask* is a boolean tensor shaped like the weight, ``True`` where the weight is
removed. Lower scores are removed first.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import PruningError
from ..patterns import Target  # noqa: F401 - re-exported: the methods' unit of work


#: Elements of ``scores`` `lowest_k_mask` works on at once: its temporaries (the k-th value's
#: working copy, integer counts) are about five times the scores, so a wide weight is done in
#: slices of rows that keep them small (each row's choice is independent of the others).
MASK_CHUNK_ELEMENTS = 1 << 22


def lowest_k_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Exactly ``k`` True entries along ``dim``: the lowest scores, ties broken by position.

    A k-th value threshold plus a tie fix-up: several times faster than ``topk`` for large ``k``.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[dim]:
        return torch.ones_like(scores, dtype=torch.bool)
    dim = dim % scores.dim()
    if dim != 0 and scores.numel() > MASK_CHUNK_ELEMENTS and scores.shape[0] > 1:
        step = max(1, MASK_CHUNK_ELEMENTS * scores.shape[0] // scores.numel())
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
        for start in range(0, scores.shape[0], step):
            out[start:start + step] = _lowest_k(scores[start:start + step], k, dim)
        return out
    return _lowest_k(scores, k, dim)


def _lowest_k(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    threshold = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
    mask = scores < threshold
    ties = scores == threshold
    need = k - mask.sum(dim=dim, keepdim=True)
    return mask | (ties & (ties.cumsum(dim=dim) <= need))


def budget(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a ``sparsity`` removes: the nearest whole number, but never all
    of them (a sparsity below 1 keeps at least one weight of every row, or of every matrix, that
    shares a budget)."""
    removed = int(round(count * sparsity))
    return min(removed, count - 1) if sparsity < 1 else removed


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive inputs of each row, remove the ``m - n`` lowest scores."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(grouped, m - n, dim=2).reshape(rows, cols)


def prune_mask(scores: torch.Tensor, target: Target, scope: str = "row") -> torch.Tensor:
    """Prune mask for ``scores`` (out x in) meeting ``target`` exactly."""
    if target.is_nm:
        return nm_prune_mask(scores, target.pattern.n, target.pattern.m)
    if target.pattern.kind != "unstructured":
        raise PruningError(f"prune_mask handles unstructured and N:M targets, not {target.pattern}.")
    if scope == "row":
        return lowest_k_mask(scores, budget(scores.shape[1], target.sparsity), dim=1)
    if scope == "matrix":
        flat = scores.reshape(-1)
        return lowest_k_mask(flat, budget(flat.numel(), target.sparsity), dim=0).reshape(scores.shape)
    raise PruningError(f"scope must be 'row' or 'matrix', got {scope!r}.")


def stacked_prune_mask(
    scores: torch.Tensor, target: Target, row_sizes: Sequence[int] | None = None, scope: str = "matrix"
) -> torch.Tensor:
    """``prune_mask`` for several matrices stacked along rows (Linears sharing an input), each
    matrix keeping its own budget."""
    if row_sizes is None or len(row_sizes) == 1 or scope == "row" or target.is_nm:
        return prune_mask(scores, target, scope=scope)
    return torch.cat([prune_mask(part, target, scope=scope) for part in scores.split(list(row_sizes), 0)], 0)


def budget_groups(rows: int, target: Target, scope: str, row_sizes: Sequence[int] | None) -> torch.Tensor | None:
    """Which rows share one budget: None when every row has its own (per-row scope, N:M), else the
    index of each row's matrix (per-matrix scope over stacked matrices)."""
    if target.is_nm or scope == "row":
        return None
    sizes = list(row_sizes) if row_sizes is not None else [rows]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def budget_totals(values: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Per-row ``values`` summed over the rows sharing a budget, broadcast back to every row."""
    if groups is None:
        return values
    groups = groups.to(values.device)
    totals = torch.zeros(int(groups.max()) + 1, dtype=values.dtype, device=values.device)
    return totals.index_add_(0, groups, values)[groups]


def measured_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = weight.shape
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzero <= n).all())
