"""Whole experts removed from mixture-of-experts blocks (structured), with their router rows,
chosen by the method from what the calibration tokens routed to them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...calibration.capture import ExpertUsageCollector
from ...methods.structured import ExpertUsage
from ...runtime.distributed import reduce_sums
from ...runtime.offload import current_value, set_param
from ...structure.moe import MoEBlock, check_removal, moe_blocks, remove_experts
from ..solves import Piece, Problem
from .base import HeldTask, LayerRun


@dataclass(frozen=True)
class ExpertDropTask(HeldTask):
    """Remove ``remove`` whole experts (possibly 0) of the MoE block ``block`` (structured)."""

    label = "MoE blocks losing experts"
    held = "block"
    block: MoEBlock
    remove: int

    @classmethod
    def applies(cls, planner) -> bool:
        return planner.structured and planner.method.removes_experts

    @classmethod
    def plan_layer(cls, planner, layer, layer_name, index):
        """The MoE blocks of one layer with the number of experts each loses: ``sparsity`` (or the
        block's or layer's override) is the fraction of the block's routed experts removed."""
        tasks = []
        for block in moe_blocks(layer, layer_name, planner.config.targets, planner.config.ignore):
            sparsity = planner.module_sparsity([block.name, layer_name])
            remove = math.floor(sparsity * block.num_experts / block.groups + 0.5) * block.groups
            check_removal(block, remove)
            tasks.append(cls(block, remove))
        return tasks

    def prunes(self) -> bool:
        return self.remove > 0

    def banks(self):
        block = self.block
        return {f"{block.experts_name}.{name}": p.numel()
                for name, p in block.experts.named_parameters(recurse=False) if p.dim() == 3}

    def target_key(self) -> str:
        return f"remove {self.remove} experts"

    @classmethod
    def collector(cls, tasks, run: LayerRun):
        return ExpertUsageCollector([task.block for task in tasks])

    @classmethod
    def problems(cls, tasks, run: LayerRun, stats, collector):
        """Each block losing experts is one problem: the method picks the experts it keeps from what
        the calibration tokens routed to them; every process then removes the others."""
        if collector is not None:
            reduce_sums([*collector.tokens.values(), *collector.weighted_norm.values()])
        problems = []
        for task in tasks:
            if task.remove == 0:
                run.report.record(task.name, 0, task.block.params)
            else:
                problems.append(task._problem(run, collector))
        return problems

    def _problem(self, run: LayerRun, collector) -> Problem:
        block, count, method = self.block, self.block.num_experts, run.method

        def solve():
            found = collector.usage(block) if collector is not None else ExpertUsage(
                torch.zeros(count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64), block.groups)
            keep = method.select_experts(found, self.remove).to(torch.long).sort().values
            if keep.numel() != count - self.remove or keep.unique().numel() != keep.numel():
                raise RuntimeError(f"{method.name} kept {keep.numel()} distinct experts of {self.name}, "
                                   f"expected {count - self.remove}")
            return {"keep": keep}

        def take(_, result) -> None:
            before, keep = block.params, result["keep"]
            remove_experts(block, keep, set_param, read=current_value)
            run.report.record(self.name, before - block.params, before)
            run.report.removed_experts[self.name] = sorted(set(range(count)) - set(keep.tolist()))
            run.note({f"{self.name}.keep_experts": keep})

        return Problem([Piece(float(count), solve)], take)

    def replay(self, changes, device) -> None:
        if f"{self.name}.keep_experts" in changes:
            remove_experts(self.block, changes[f"{self.name}.keep_experts"], set_param, read=current_value)
