"""Between the plan and the methods: a task's weights read as the problem a method solves, and
the method's result checked and written back (channel groups shrunk, expert banks edited one
expert at a time); shared by the layer-wise and the global engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from typing import Callable

import torch

from ..errors import PruningError
from ..methods.base import PruningMethod
from ..methods.magnitude import Magnitude, MagnitudeOptions
from ..methods.structured import StructuredProblem, StructuredResult
from ..patterns import Target
from ..structure.experts import ExpertBank, expert_matrix, set_expert_matrix
from ..structure.moe import ExpertChannels
from ..structure.groups import ChannelGroup
from ..structure.shrink import shrink_group
from ..runtime.offload import commit_value, current_value, editable_value, read_weight, set_param
from .report import PruneReport
from .solves import Piece, Problem
from ..calibration.statistics import InputStatistics


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


def apply_to_group(group: ChannelGroup, result: StructuredResult, weights, report: PruneReport, method: str) -> None:
    """Shrink ``group`` to a method's ``result`` (the kept units, the re-fitted consumer or None: sliced)
    and record it in ``report``."""
    if result.consumer_weight is not None:
        check_finite_result(method, group.consumer_name, result.consumer_weight)
    before = group.params
    shrink_group(group, result.keep, weights, result.consumer_weight, set_param=set_param)
    report.sparsity[group.name] = 1.0 - group.params / before
    report.pruned_params += before - group.params
    if result.declined_growth is not None:
        report.declined_refits[group.name] = float(result.declined_growth)


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
    stored: torch.Tensor | None = None  # the new bank, as stored (what a checkpoint records)
    pruned: int = 0
    total: int = 0
    fallbacks: int = 0  # experts pruned by magnitude for lack of tokens
    experts: int = 0  # experts solved so far (the bank is done when all are: several chunks)


def expert_bank_problem(method: PruningMethod, bank: ExpertBank, target: Target,
                        stats: list[InputStatistics] | None, min_tokens: int, device: torch.device,
                        done: Callable[[SolvedBank], None], experts: range | None = None,
                        solved: SolvedBank | None = None) -> Problem:
    """The ``experts`` of ``bank`` (default: all) pruned to ``target``, each as its own 2-D problem
    (one piece each), with ``stats[e]`` (None: a method without calibration). Each expert is read as
    a float32 ``[out, in]`` copy on ``device``, solved, and written into the bank in its dtype; the
    bank is committed once per problem; ``solved`` carries the counts from chunk to chunk and goes to
    ``done`` once every expert is solved. An expert that received fewer than ``min_tokens`` tokens is
    pruned by magnitude at the same target."""
    fallback = Magnitude(MagnitudeOptions())
    stored = cache(lambda: editable_value(bank.module, bank.param))  # the bank, edited one expert at a time
    solved = SolvedBank() if solved is None else solved
    experts = range(bank.num_experts) if experts is None else experts

    def solver(expert: int):
        found = None if stats is None else stats[expert]
        return (fallback, None) if found is not None and found.count < min_tokens else (method, found)

    def solve(expert: int):
        where = f"{bank.name}[{expert}]"
        chosen, expert_stats = solver(expert)
        if expert_stats is not None:
            expert_stats.check_finite(where)
        weight = expert_matrix(bank, expert, stored()).to(device=device, dtype=torch.float32)
        check_finite_weight(where, weight)
        result = chosen.prune_linears([weight], expert_stats, target)[0]
        check_finite_result(method.name, where, result.weight)
        return {"value": result.weight.to(dtype=stored().dtype).masked_fill(result.mask, 0)}

    def take(index: int, result) -> None:
        value = result["value"]
        set_expert_matrix(bank, stored(), experts[index], value.to(stored().device))
        solved.pruned += int((value == 0).sum())  # the zeros it holds: the mask's, and any the solve left
        solved.total += value.numel()
        solved.fallbacks += solver(experts[index])[0] is fallback
        solved.experts += 1

    def finish() -> None:
        commit_value(bank.module, bank.param, stored())
        solved.stored = stored()
        if solved.experts == bank.num_experts:
            done(solved)

    pieces = [Piece(solver(e)[0].solve_flops(bank.out_features, bank.in_features), partial(solve, e))
              for e in experts]
    return Problem(pieces, take, finish)


@dataclass
class NarrowedExperts:
    up: torch.Tensor  # the new up (gate_up) bank, laid out as the module stores it
    down: torch.Tensor  # the new down bank
    up_bias: torch.Tensor | None  # the new up bias, if the module has one
    fallbacks: int  # experts whose channels were chosen by magnitude for lack of tokens

    def tensors(self, channels: ExpertChannels) -> dict[str, torch.Tensor]:
        """Parameter name -> new tensor (what a checkpoint records)."""
        found = {channels.up.param: self.up, channels.down.param: self.down}
        if self.up_bias is not None:
            found[channels.bias(channels.up)] = self.up_bias
        return found


def _stats_count(*stats) -> int | None:
    counts = [s.count for s in stats if s is not None]
    return min(counts) if counts else None


def narrow_expert(solver: PruningMethod, method: str, channels: ExpertChannels, expert: int, remove: int, values,
                  up_stats: InputStatistics | None, down_stats: InputStatistics | None, device) -> dict:
    """Expert ``expert``'s channels chosen by ``solver`` as the units of one `StructuredProblem`
    (producers: its gate and up rows; consumer: its down projection): its kept up rows, its down
    projection (restored or sliced) and its kept up bias, from ``values`` (the up bank, the down
    bank, the up bias or None)."""
    where = f"{channels.name}[{expert}]"
    up_all, down_all, bias_all = values
    width = channels.width
    up = expert_matrix(channels.up, expert, up_all).to(device=device, dtype=torch.float32)
    down = expert_matrix(channels.down, expert, down_all).to(device=device, dtype=torch.float32)
    check_finite_weight(where, up)
    check_finite_weight(where, down)
    units = torch.arange(width, device=device)
    problem = StructuredProblem(kind="mlp", units=width, producers=[up[rows] for rows in channels.producer_rows(units)],
                                rows_per_unit=[1] * (2 if channels.has_gate else 1), consumer=down, cols_per_unit=1,
                                producer_stats=up_stats, consumer_stats=down_stats)
    result = solver.prune_structured(problem, remove)
    keep = result.keep.to(device=device, dtype=torch.long).sort().values
    if keep.numel() != width - remove:
        raise RuntimeError(f"{method} kept {keep.numel()} channels of {where}, expected {width - remove}")
    if result.consumer_weight is not None:
        check_finite_result(method, where, result.consumer_weight)
    rows = channels.kept_rows(keep)
    found = {"up": up[rows], "down": result.consumer_weight if result.consumer_weight is not None else down[:, keep]}
    if bias_all is not None:
        found["bias"] = bias_all[expert].to(device).index_select(0, rows)
    return found


def expert_channels_problem(method: PruningMethod, channels: ExpertChannels, remove: int,
                            up_stats: list[InputStatistics] | None, down_stats: list[InputStatistics] | None,
                            min_tokens: int, device: torch.device, done: Callable[[NarrowedExperts], None],
                            experts: range | None = None, held: dict | None = None) -> Problem:
    """Remove ``remove`` channels from the ``experts`` of ``channels`` (default: all): expert ``e``'s
    channels are the units of one `StructuredProblem` (producers: its gate and up rows; consumer: its
    down projection; statistics of its own tokens), solved by ``method`` (one piece per expert), which
    may restore the down projection. ``held`` carries the narrowed experts from chunk to chunk; once
    every expert is in, the narrowed banks are handed to ``done``. An expert with fewer than
    ``min_tokens`` tokens is narrowed by magnitude."""
    fallback = Magnitude(MagnitudeOptions())
    bias_name = channels.bias(channels.up)

    @cache
    def values():  # (up bank, down bank, up bias or None), read once, when first needed
        return (current_value(channels.module, channels.up.param), current_value(channels.module, channels.down.param),
                current_value(channels.module, bias_name) if bias_name else None)

    width = channels.width
    held = {} if held is None else held  # expert -> its narrowed tensors
    experts = range(channels.num_experts) if experts is None else experts

    def solver(expert: int):
        u_stats = up_stats[expert] if up_stats is not None else None
        d_stats = down_stats[expert] if down_stats is not None else None
        count = _stats_count(u_stats, d_stats)
        return (fallback, None, None) if count is not None and count < min_tokens else (method, u_stats, d_stats)

    def solve(expert: int):
        chosen, u_stats, d_stats = solver(expert)
        return narrow_expert(chosen, method.name, channels, expert, remove, values(), u_stats, d_stats, device)

    def take(index: int, result) -> None:
        held[experts[index]] = result

    def finish() -> None:
        if len(held) < channels.num_experts:
            return
        parts = [held.pop(e) for e in range(channels.num_experts)]
        up_all, down_all, bias_all = values()
        up_bank, down_bank = torch.stack([p["up"] for p in parts]), torch.stack([p["down"] for p in parts])  # [E, out, in]
        if channels.up.transposed:
            up_bank = up_bank.transpose(1, 2).contiguous()
        if channels.down.transposed:
            down_bank = down_bank.transpose(1, 2).contiguous()
        bias = torch.stack([p["bias"] for p in parts]).to(bias_all.dtype) if bias_all is not None else None
        fallbacks = sum(solver(e)[0] is fallback for e in range(channels.num_experts))
        done(NarrowedExperts(up_bank.to(up_all.dtype), down_bank.to(down_all.dtype), bias, fallbacks))

    pieces = [Piece(solver(e)[0].solve_flops(channels.down.out_features, width), partial(solve, e))
              for e in experts]
    return Problem(pieces, take, finish)
