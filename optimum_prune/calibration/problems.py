"""Between the plan and the methods: a task's weights read as the problem a method solves, and
the method's result checked and written back (channel groups shrunk, expert banks edited one
expert at a time); shared by the layer-wise and the global engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruningError
from ..methods.base import PruningMethod
from ..methods.magnitude import Magnitude, MagnitudeOptions
from ..methods.structured import StructuredProblem
from ..patterns import Target
from ..structure.experts import ExpertBank, expert_matrix, set_expert_matrix
from ..structure.groups import ChannelGroup
from ..structure.shrink import shrink_group
from .offload import commit_value, editable_value, read_weight, set_param
from .report import PruneReport
from .statistics import InputStatistics


def read_group_problem(group: ChannelGroup, device, producer_stats, consumer_stats):
    """The `StructuredProblem` of a channel group (float32 weights on ``device``), and the weights
    by name (producers' biases as ``<name>.bias``) for `shrink_group`."""
    weights = {p.name: read_weight(p.linear, device) for p in group.producers}
    weights[group.consumer_name] = read_weight(group.consumer, device)
    for p in group.producers:
        if p.linear.bias is not None:
            weights[p.name + ".bias"] = read_weight(p.linear, device, "bias")
    for name, weight in weights.items():
        check_finite_weight(name, weight)
    problem = StructuredProblem(
        kind=group.kind,
        units=group.units,
        producers=[weights[p.name][p.rows(group.units)] for p in group.producers],
        rows_per_unit=[p.rows_per_unit for p in group.producers],
        consumer=weights[group.consumer_name],
        cols_per_unit=group.cols_per_unit,
        producer_stats=producer_stats,
        consumer_stats=consumer_stats,
    )
    return problem, weights


def apply_to_group(group: ChannelGroup, keep, weights, consumer_weight, report: PruneReport, method: str) -> None:
    """Shrink ``group`` to the units ``keep`` (a method's result) and record it in ``report``."""
    if consumer_weight is not None:
        check_finite_result(method, group.consumer_name, consumer_weight)
    before = group.params
    shrink_group(group, keep, weights, consumer_weight, set_param=set_param)
    report.sparsity[group.name] = 1.0 - group.params / before
    report.pruned_params += before - group.params


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """Refuse a model weight that holds NaN or inf before it is pruned (no method can fix it)."""
    if not bool(torch.isfinite(weight).all()):
        raise PruningError(f"The model's weight {name} holds NaN or inf before pruning: the model file is damaged or "
                           f"was saved in a dtype that overflowed; re-download or re-save the model, or leave "
                           f"{name} out with ignore=[...] (--ignore).")


def check_finite_result(method: str, name: str, weight: torch.Tensor) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise PruningError(f"{method} produced non-finite weights for {name} from finite ones: its linear systems are "
                           f"too ill-conditioned; raise dampening (--dampening), e.g. to 0.1.")


@dataclass
class SolvedBank:
    stored: torch.Tensor  # the new bank, as stored (what a checkpoint records)
    pruned: int
    total: int
    fallbacks: int  # experts pruned by magnitude for lack of tokens


def solve_expert_bank(method: PruningMethod, bank: ExpertBank, target: Target,
                      stats: list[InputStatistics] | None, min_tokens: int, device: torch.device) -> SolvedBank:
    """Prune every expert of ``bank`` to ``target`` as its own 2-D problem, with ``stats[e]`` (None:
    a method without calibration). Each expert is read as a float32 ``[out, in]`` copy on
    ``device``, solved, and written into the bank in its dtype; the bank is committed once. An
    expert that received fewer than ``min_tokens`` tokens is pruned by magnitude at the same target."""
    fallback = Magnitude(MagnitudeOptions())
    stored = editable_value(bank.module, bank.param)  # the bank, edited one expert at a time
    pruned = total = fallbacks = 0
    for expert in range(bank.num_experts):
        where = f"{bank.name}[{expert}]"
        expert_stats = None if stats is None else stats[expert]
        solver = method
        if expert_stats is not None and expert_stats.count < min_tokens:
            solver, expert_stats, fallbacks = fallback, None, fallbacks + 1
        elif expert_stats is not None:
            expert_stats.check_finite(where)
        weight = expert_matrix(bank, expert, stored).to(device=device, dtype=torch.float32)
        check_finite_weight(where, weight)
        result = solver.prune_linears([weight], expert_stats, target)[0]
        check_finite_result(method.name, where, result.weight)
        value = result.weight.to(dtype=stored.dtype).masked_fill(result.mask, 0)
        set_expert_matrix(bank, stored, expert, value.to(stored.device))
        pruned += int(result.mask.sum())
        total += result.mask.numel()
    commit_value(bank.module, bank.param, stored)
    return SolvedBank(stored, pruned, total, fallbacks)
