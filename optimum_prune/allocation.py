"""Spending one sparsity budget over many parts (layers, channel groups): the arithmetic shared by
policy-gradient global pruning and the non-uniform sparsity profiles of unstructured pruning.

- `shift_into_budget`: move every part's value by the same shift, clipped to a box, so that the
  cost-weighted total meets the budget (bisection on the shift).
- `allocate`: a fractional knapsack over measured damage curves — each part's curve through its
  measured (share removed, damage) points, convexified; segments taken cheapest damage per
  parameter first.
- `outlier_allocation`: OWL's rule (Yin et al. 2024): parts with a higher outlier ratio keep more.
- `choose_options`: one of a few discrete options per part (N:M patterns, dense) at the least
  summed damage for a mean sparsity at least the budget (the Lagrangian relaxation).

Nothing here knows about models, hooks or methods: tensors and lists in, numbers out.
"""

from __future__ import annotations

from typing import Callable

import torch


def shift_into_budget(y: torch.Tensor, cost: torch.Tensor, total: float, low: float, high: float) -> torch.Tensor:
    """``clip(y - lambda, low, high)`` with the shift ``lambda`` found by bisection so that
    ``sum(cost * value) = total`` (to bisection precision): every part moves by the same amount
    until it meets its bound."""
    lam = bisect_shift(lambda lam: float((cost * (y - lam).clamp(low, high)).sum()), total,
                       float(y.min()) - 1.0, float(y.max()) + 1.0)
    return (y - lam).clamp(low, high)


def bisect_shift(spent: Callable[[float], float], total: float, lo: float, hi: float, rounds: int = 60) -> float:
    """The shift ``lambda`` in ``[lo, hi]`` at which ``spent(lambda)`` (non-increasing in it) meets
    ``total``, by bisection."""
    for _ in range(rounds):
        mid = 0.5 * (lo + hi)
        if spent(mid) > total:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _lower_hull(r: torch.Tensor, d: torch.Tensor) -> list[tuple[float, float]]:
    """The lower convex hull of ``(0, 0)`` and the points ``(r_i, d_i)`` (``r`` increasing)."""
    hull = [(0.0, 0.0)]
    for point in zip(r.tolist(), d.tolist()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) >= (point[1] - y0) * (x1 - x0):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(curves, params: torch.Tensor, target: float) -> list[float]:
    """Removed share per part minimising the summed damage under ``sum(share * params) = target``,
    each part's damage the piecewise-linear curve through its points (convexified): the segments
    of all parts are taken cheapest damage per parameter first, the last one in part. Shares stop
    at each part's last measured point."""
    segments = []  # (damage per parameter, part, share length)
    for g, (r, d) in enumerate(curves):
        hull = _lower_hull(r, d)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y1 - y0) / ((x1 - x0) * float(params[g])), g, x1 - x0))
    shares = [0.0] * len(curves)
    left = target
    for _, g, length in sorted(segments, key=lambda seg: seg[0]):
        if left <= 0:
            break
        take = min(length, left / float(params[g]))
        shares[g] += take
        left -= take * float(params[g])
    return shares


def outlier_allocation(ratios: torch.Tensor, weights: torch.Tensor, sparsity: float, spread: float,
                       low: float = 0.0, high: float = 0.99) -> torch.Tensor:
    """OWL's per-layer sparsities: the layers' outlier ratios mapped linearly onto a range of width
    ``2 * spread`` (the largest ratio gets the lowest sparsity), then shifted (within ``[low,
    high]``) so that the weight-weighted mean sparsity is ``sparsity``."""
    ratios = ratios.to(torch.float64)
    weights = weights.to(torch.float64)
    span = float(ratios.max() - ratios.min())
    scaled = (ratios - ratios.min()) / span if span > 0 else torch.zeros_like(ratios)
    proposal = sparsity + spread - 2 * spread * scaled  # before the shift that meets the budget
    return shift_into_budget(proposal, weights, sparsity * float(weights.sum()), low, high)


def choose_options(damage: torch.Tensor, sparsity: torch.Tensor, weights: torch.Tensor, target: float) -> list[int]:
    """For each part ``i`` one option ``k`` (``damage[i, k]`` measured, ``sparsity[k]`` what it
    removes) so that the ``weights``-weighted mean sparsity is at least ``target`` at the least
    summed damage the Lagrangian relaxation finds: every part takes ``argmin_k damage[i, k] -
    price * weights[i] * sparsity[k]`` (the first option on ties), with the smallest price, found by
    bisection, that meets the budget. Raises ValueError when no choice can meet it."""
    damage, sparsity, weights = (t.to(torch.float64) for t in (damage, sparsity, weights))
    need = target * float(weights.sum()) - 1e-9

    def pick(price: float) -> torch.Tensor:
        return torch.argmin(damage - price * weights[:, None] * sparsity[None, :], dim=1)

    def removed(choice: torch.Tensor) -> float:
        return float((weights * sparsity[choice]).sum())

    if removed(pick(0.0)) >= need:
        return pick(0.0).tolist()
    if float(weights.sum() * sparsity.max()) < need:
        raise ValueError(f"no choice of options reaches a mean sparsity of {target}")
    high = 1.0
    while removed(pick(high)) < need:
        high *= 2.0
    low = 0.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        if removed(pick(mid)) >= need:
            high = mid
        else:
            low = mid
    return pick(high).tolist()
