"""The structured side of the method interface: one channel group in, kept units out.

The engine hands a method a `StructuredProblem`: the float32 weights of the Linears that produce
an intermediate dimension (rows, ``rows_per_unit`` per unit), the weight of the Linear that
consumes it (columns, ``cols_per_unit`` per unit), the input statistics of both, and how many
units to remove. The method returns the units to keep and, optionally, a new consumer weight on
the kept columns (a restoration). It never sees modules, hooks or devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..structure.groups import unit_indices
from .linalg import restore_columns



@dataclass
class StructuredProblem:
    kind: str  # "mlp" | "attention"
    units: int
    producers: list[torch.Tensor]  # weights (out x in), rows_per_unit[i] consecutive rows per unit
    rows_per_unit: list[int]
    consumer: torch.Tensor  # out x (units * cols_per_unit)
    cols_per_unit: int
    producer_stats: object | None = None  # statistics of the producers' (shared) input
    consumer_stats: object | None = None  # statistics of the consumer's input


@dataclass
class StructuredResult:
    keep: torch.Tensor  # sorted indices of the kept units
    consumer_weight: torch.Tensor | None = None  # out x (kept * cols_per_unit), or None to slice
    #: a least-squares re-fit declined under ``max_restore_growth``: its Frobenius norm over the dense
    #: consumer's (the consumer kept its kept columns); None when nothing was declined
    declined_growth: float | None = None


def per_unit(values: torch.Tensor, per: int) -> torch.Tensor:
    """Sum a per-row (or per-column) vector over the ``per`` consecutive entries of each unit."""
    return values.reshape(-1, per).sum(1)


def column_scores(problem: StructuredProblem, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per unit: ``sum_i |W_ij|`` over the consumer's columns, times ``||Z_j||`` when given."""
    mass = problem.consumer.abs().sum(0)
    if input_norm is not None:
        mass = mass * input_norm.to(mass)
    return per_unit(mass, problem.cols_per_unit)


def row_scores(problem: StructuredProblem, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per unit: the producers' row masses ``sum_k |W_jk|`` (times ``||X_k||`` when given)."""
    total = torch.zeros(problem.units, dtype=problem.consumer.dtype, device=problem.consumer.device)
    for weight, rows in zip(problem.producers, problem.rows_per_unit):
        scaled = weight.abs() if input_norm is None else weight.abs() * input_norm.to(weight).unsqueeze(0)
        total += per_unit(scaled.sum(1), rows)
    return total


def keep_top(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of the ``len(scores) - remove`` highest scores (ties: lower index kept)."""
    keep = scores.numel() - remove
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values


def keep_top_per_group(scores: torch.Tensor, remove: int, groups: int = 1) -> torch.Tensor:
    """`keep_top` within each of ``groups`` equal consecutive groups, ``remove / groups`` from each."""
    size = scores.numel() // groups
    kept = [keep_top(scores[g * size:(g + 1) * size], remove // groups) + g * size for g in range(groups)]
    return torch.cat(kept)


@dataclass
class ExpertUsage:
    """What calibration saw of the routed experts of one MoE block (one entry per expert)."""

    tokens: torch.Tensor  # tokens the router sent to each expert
    weighted_norm: torch.Tensor  # sum over those tokens of routing weight * ||expert output||
    groups: int = 1  # the router picks among this many equal, consecutive groups of experts first

    @property
    def num_experts(self) -> int:
        return self.tokens.numel()


def restore_units(problem: StructuredProblem, keep: torch.Tensor, dampening: float) -> torch.Tensor:
    """FASP's restoration: the consumer re-fitted by least squares on the kept units' columns."""
    cols = unit_indices(keep, problem.cols_per_unit)
    return restore_columns(problem.consumer, problem.consumer_stats.gram, cols, dampening)


class LeastSquaresRestore:
    """`restore` as FASP does it (mixed into FASP and policy gradient): the consumer re-fitted by
    least squares on the kept units' columns, unless the method's ``restore`` option is off."""

    def solve_flops(self, rows: int, cols: int) -> float:
        """The unit scores and the least-squares restoration of the consumer: Gram copies and one
        factorisation (about cols^3 together, fitted to FASP's solves of one decoder layer at 576-4096
        wide: estimate / measured 0.87-1.02, 1.44 on a Qwen2-7B-like layer) and one solve (2 rows cols^2)."""
        return float(cols) ** 3 + 2.0 * rows * cols * cols

    def restore(self, problem: StructuredProblem, keep: torch.Tensor) -> StructuredResult:
        if not self.options.restore:
            return StructuredResult(keep)
        restored = restore_units(problem, keep, self.dampening)
        limit = self.options.max_restore_growth
        if limit is not None:
            norm, dense = float(restored.norm()), float(problem.consumer.float().norm())
            if norm > limit * dense:
                # the kept columns as they are: a re-fit larger than the dense consumer rebuilds what the removed
                # units carried by amplifying the kept inputs (the policy-gradient search drops a unit that
                # carries most of a layer's output when the loss does not need it; docs/methods/policy_gradient.md)
                return StructuredResult(keep, declined_growth=norm / dense)
        return StructuredResult(keep, restored)


@dataclass
class Gate:
    """A depth unit beside the channel groups: a decoder layer, or its attention or MLP block, kept or
    removed whole. Removing it removes the units of ``groups`` with it."""

    groups: list[int]  # the channel groups inside the unit (indices into the problem's groups)
    params: int  # the unit's parameters outside those groups (counted in the budget, removed with it)
    score: float  # initial importance (e.g. block influence: 1 - cosine of the residual stream around it)
    kind: str = "layer"  # "layer", "attention" or "mlp": what a per-block cost model charges for it


@dataclass
class GlobalProblem:
    """Every prunable unit of the model, grouped as the engine's channel groups, and optionally
    ``gates``: layers or blocks that can go whole."""

    kinds: list[str]  # per group: "mlp" | "attention"
    unit_params: list[int]  # per group: parameters removed with one unit
    scores: list[torch.Tensor]  # per group: initial importance of each unit
    sparsity: float  # fraction of the groups' (and gates') parameters to remove
    #: masks (one float tensor K x units per group, then, when there are gates, one K x gates),
    #: optional batch index -> per-mask language-model loss (K,); without an index each call takes
    #: the next calibration batch in turn
    evaluate: Callable[..., torch.Tensor]
    progress: bool = False
    seed: int = 0
    channel_multiple: int = 1  # MLP groups keep a multiple of this many units (see structure/budget.py)
    gates: list[Gate] = field(default_factory=list)
    history: list = field(default_factory=list)
    #: a search state handed to ``save`` by an earlier, interrupted run of the same problem: the
    #: method continues from it (None: from the start)
    resume: dict | None = None
    #: called with the search state (tensors, numbers, lists) after the start and every
    #: ``save_every`` steps, so that the engine can keep it (None: nothing saved)
    save: Callable[[dict], None] | None = None
    save_every: int = 10
