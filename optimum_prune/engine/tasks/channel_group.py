"""A channel group shrunk (structured): the producers' rows and the consumer's columns of some
units (MLP channels, attention heads or KV groups) removed, the consumer optionally restored."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...methods.structured import StructuredResult
from ...patterns import resolve_sparsity
from ...runtime.offload import set_param
from ...structure.budget import plan_removals
from ...structure.groups import ChannelGroup, group_selected, has_layout, layer_groups
from ...structure.layers import first_match, linear_params
from ...structure.shrink import shrink_group
from ..problems import apply_to_group, read_group_problem
from ..solves import Piece, Problem
from .base import HeldTask, LayerRun


@dataclass(frozen=True)
class GroupTask(HeldTask):
    """Remove ``remove`` units (possibly 0) of the channel group ``group`` (structured)."""

    label = "channel groups"
    held = "group"
    group: ChannelGroup
    remove: int

    @classmethod
    def applies(cls, planner) -> bool:
        return planner.structured and not planner.method.removes_experts and has_layout(planner.model)

    @classmethod
    def plan_layer(cls, planner, layer, layer_name, index):
        """The layer's channel groups with the units each removes: the config's sparsity of the
        layer's Linears spread over its selected groups, overrides fixed (`plan_removals`), or the
        removals the caller decided (`LayerPlan.given_removal`)."""
        groups = layer_groups(planner.model, layer, layer_name, index)
        cfg, pattern = planner.config, planner.pattern
        excluded, fixed = set(), {}
        for group in groups:
            if not group_selected(group, cfg.targets, cfg.ignore):
                excluded.add(group.name)
            elif (override := first_match(group.name, cfg.overrides)) is not None:
                fixed[group.name] = resolve_sparsity(override.get("sparsity"), pattern, f"overrides[{group.name}]: ")
        layer_override = first_match(layer_name, cfg.overrides) or {}
        sparsity = resolve_sparsity(layer_override.get("sparsity", cfg.sparsity), pattern, f"{layer_name}: ")
        layer_params = linear_params(layer)
        planner.fixed_params[index] = layer_params - sum(g.params for g in groups)  # Linears that cannot shrink
        if planner.removals is not None:  # widths decided by the caller
            return [cls(g, planner.given_removal(g)) for g in groups]
        removals = plan_removals(groups, sparsity, fixed, excluded, layer_params, cfg.channel_multiple)
        return [cls(g, removals[g.name]) for g in groups]

    def prunes(self) -> bool:
        return self.remove > 0

    def linears(self):
        return [p.linear for p in self.group.producers] + [self.group.consumer]

    def target_key(self) -> str:
        return f"remove {self.remove} units"

    def hooked(self, method):
        """The consumer's input; the producers' only if the method scores with their statistics."""
        if self.remove == 0:
            return {}
        hooked = {}
        if method.producer_statistics:
            hooked.update({p.name: (p.linear, method.producer_statistics) for p in self.group.producers})
        hooked[self.group.consumer_name] = (self.group.consumer, method.statistics)
        return hooked

    @classmethod
    def problems(cls, tasks, run: LayerRun, stats, collector):
        """Each group removing units is one problem: the method picks the units (or they are fixed
        by the caller and it only restores the consumer); every process then shrinks the group."""
        problems = []
        for task in tasks:
            if task.remove == 0:
                run.report.sparsity[task.name] = 0.0
                run.report.total_params += task.group.params
            else:
                problems.append(task._problem(run, stats))
        return problems

    def _problem(self, run: LayerRun, stats) -> Problem:
        name, group, remove, method = self.name, self.group, self.remove, run.method

        def solve():
            problem, _ = read_group_problem(group, run.device, stats.get(group.producers[0].name),
                                            stats.get(group.consumer_name))
            if run.kept_units is not None and name in run.kept_units:  # units fixed: only restore
                keep = run.kept_units[name].to(device=problem.consumer.device, dtype=torch.long).sort().values
                result = method.restore(problem, keep)
            else:
                result = method.prune_structured(problem, remove)
            if result.keep.numel() != group.units - remove:
                raise RuntimeError(f"{method.name} kept {result.keep.numel()} units of {name}, "
                                   f"expected {group.units - remove}")
            found = {"keep": result.keep}
            if result.consumer_weight is not None:
                found["consumer"] = result.consumer_weight
            if result.declined_growth is not None:  # results travel between processes as tensors
                found["declined_growth"] = torch.tensor([result.declined_growth], dtype=torch.float64)
            return found

        def take(_, result) -> None:
            _, weights = read_group_problem(group, run.device, None, None)
            run.report.total_params += group.params
            growth = result.get("declined_growth")
            solved = StructuredResult(result["keep"], result.get("consumer"), None if growth is None else float(growth))
            apply_to_group(group, solved, weights, run.report, method.name)
            run.note({f"{name}.{key}": result[key] for key in ("keep", "consumer") if key in result})

        return Problem([Piece(method.solve_flops(group.consumer.out_features, group.consumer.in_features), solve)], take)

    def replay(self, changes, device) -> None:
        if f"{self.name}.keep" in changes:
            _, weights = read_group_problem(self.group, device, None, None)
            shrink_group(self.group, changes[f"{self.name}.keep"], weights, changes.get(f"{self.name}.consumer"),
                         set_param=set_param)

    @classmethod
    def solver_bytes(cls, tasks, method):
        """The method's copies of the consumer problem (out x the group's width), plus the
        producers' kept rows, sliced once (rows x their own input width)."""
        found = []
        for task in tasks:
            group = task.group
            producers = sum(4 * p.rows_per_unit * group.units * p.linear.in_features for p in group.producers)
            found.append(producers + method.workspace_bytes(group.consumer.out_features, group.consumer.in_features))
        return found

    @classmethod
    def solve_flops(cls, tasks, method):
        return sum(method.solve_flops(t.group.consumer.out_features, t.group.consumer.in_features) for t in tasks)
