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
    def solve(cls, tasks, run: LayerRun, stats, collector) -> None:
        report = run.report
        if collector is not None:
            reduce_sums([*collector.tokens.values(), *collector.weighted_norm.values()])
        for task in tasks:
            block = task.block
            before, count = block.params, block.num_experts
            if task.remove == 0:
                report.record(task.name, 0, before)
                continue
            found = collector.usage(block) if collector is not None else ExpertUsage(
                torch.zeros(count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64), block.groups)
            keep = run.method.select_experts(found, task.remove).to(torch.long).sort().values
            if keep.numel() != count - task.remove or keep.unique().numel() != keep.numel():
                raise RuntimeError(f"{run.method.name} kept {keep.numel()} distinct experts of {task.name}, "
                                   f"expected {count - task.remove}")
            remove_experts(block, keep, set_param, read=current_value)
            report.record(task.name, before - block.params, before)
            report.removed_experts[task.name] = sorted(set(range(count)) - set(keep.tolist()))
            run.note({f"{task.name}.keep_experts": keep})

    def replay(self, changes, device) -> None:
        if f"{self.name}.keep_experts" in changes:
            remove_experts(self.block, changes[f"{self.name}.keep_experts"], set_param, read=current_value)
