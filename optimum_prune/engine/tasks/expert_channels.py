"""Narrower experts (structured, a MoE family without channel groups): every expert of a fused
experts module loses the same number of its own intermediate channels, each expert's channels
chosen as the channel group of its own 2-D problem."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from ...calibration.capture import ExpertCollector
from ...runtime.distributed import reduce_statistics
from ...runtime.offload import set_param
from ...structure.budget import round_kept
from ...structure.experts import is_fused_experts
from ...structure.groups import gated_mlp_group, has_layout, layout_for
from ...structure.moe import ExpertChannels, expert_channel_modules, narrow_experts, tied_shared_experts
from ..problems import expert_channels_problem
from .base import HeldTask, LayerRun
from .channel_group import GroupTask


#: fused expert banks run through torch's grouped matmul, whose rows must span a multiple of 16
#: bytes: experts keep a multiple of 8 intermediate channels (16 bytes in half precision)
GROUPED_MM_CHANNELS = 8


@dataclass(frozen=True)
class ExpertChannelTask(HeldTask):
    """Remove ``remove`` intermediate channels (possibly 0) of every expert of ``channels`` (structured)."""

    label = "experts modules narrowed"
    held = "channels"
    channels: ExpertChannels
    remove: int

    @classmethod
    def applies(cls, planner) -> bool:
        return planner.structured and not planner.method.removes_experts and not has_layout(planner.model)

    @classmethod
    def plan_layer(cls, planner, layer, layer_name, index):
        """The fused experts modules of one layer with the channels every expert loses: ``sparsity``
        (or an override on the experts module, its block or the layer) of each expert's
        intermediate channels, the kept count rounded to ``channel_multiple``. Shared experts whose
        width the config ties to the experts' lose channels in proportion (a channel group);
        attention, dense MLPs and other shared experts stay as they are."""
        if not any(is_fused_experts(module) for module in planner.model.modules()):
            layout_for(planner.model)  # the family's one-line refusal
        config, tasks = planner.config, []
        for channels in expert_channel_modules(layer, layer_name, config.targets, config.ignore):
            sparsity = planner.module_sparsity([channels.name, channels.name.rsplit(".", 1)[0], layer_name])
            width = channels.width
            kept = max(1, width - math.floor(sparsity * width + 0.5))
            kept = round_kept(kept, width, max(config.channel_multiple, GROUPED_MM_CHANNELS))
            tasks.append(cls(channels, width - kept))
            block_name = channels.name.rsplit(".", 1)[0]
            block = layer.get_submodule(block_name[len(layer_name) + 1:]) if block_name != layer_name else layer
            for child, mlp in tied_shared_experts(block, width, planner.model.config):
                group = gated_mlp_group(f"{block_name}.{child}", index, mlp)
                tasks.append(GroupTask(group, (width - kept) * group.units // width))
        return tasks

    def prunes(self) -> bool:
        return self.remove > 0

    def banks(self):
        return {bank.name: bank.tensor.numel() for bank in (self.channels.up, self.channels.down)}

    def target_key(self) -> str:
        return f"remove {self.remove} units"

    def collected(self, method) -> list:
        """The banks whose per-expert inputs the method needs: the down projections' (and the up
        projections' when it scores producers)."""
        if self.remove == 0:
            return []
        return ([self.channels.up] if method.producer_statistics else []) + [self.channels.down]

    @classmethod
    def collector(cls, tasks, run: LayerRun):
        banks = [bank for task in tasks for bank in task.collected(run.method)]
        if not banks:
            return None
        kinds = run.method.statistics | run.method.producer_statistics
        return ExpertCollector(banks, kinds, run.device, all_tokens=run.config.expert_calibration == "all",
                               experts=run.expert_chunk)

    @classmethod
    def statistics_banks(cls, tasks, method):
        return [bank for task in tasks for bank in task.collected(method)]

    @classmethod
    def problems(cls, tasks, run: LayerRun, stats, collector):
        """The same number of channels from every expert of each module, each expert's channels
        chosen (and its down projection restored) by the method (`expert_channels_problem`)."""
        if collector is not None:
            collector.check()
            reduce_statistics([s for found in collector.stats.values() for s in found if s is not None])
        found = collector.stats if collector is not None else {}
        chunk = None if collector is None else collector.experts  # several passes: this pass's experts
        problems = []
        for task in tasks:
            channels = task.channels
            if task.remove == 0:
                if chunk is None or chunk.start == 0:  # recorded once, with the first chunk
                    run.report.record(task.name, 0, channels.params)
                continue
            problems.append(expert_channels_problem(
                run.method, channels, task.remove, found.get(channels.up.name), found.get(channels.down.name),
                run.config.min_expert_tokens, run.device, partial(cls._narrow, task, run, channels.params),
                chunk, run.carry.setdefault(task.name, {})))
        return problems

    def _narrow(self, run: LayerRun, before: int, solved) -> None:
        channels, report = self.channels, run.report
        narrow_experts(channels, solved.up, solved.down, solved.up_bias, set_param)
        report.record(self.name, before - channels.params, before)
        report.expert_matrices += channels.num_experts
        if solved.fallbacks:
            report.expert_fallbacks[self.name] = solved.fallbacks
        run.note({f"{self.name}.{name}": value for name, value in solved.tensors(channels).items()})

    def replay(self, changes, device) -> None:
        channels = self.channels
        if f"{self.name}.{channels.down.param}" in changes:
            bias = channels.bias(channels.up)
            narrow_experts(channels, changes[f"{self.name}.{channels.up.param}"],
                           changes[f"{self.name}.{channels.down.param}"],
                           changes.get(f"{self.name}.{bias}") if bias else None, set_param)

    @classmethod
    def solver_bytes(cls, tasks, method):
        """One expert's problem at a time, plus the new banks."""
        return [method.workspace_bytes(2 * t.channels.width, t.channels.up.in_features)
                + method.workspace_bytes(t.channels.down.out_features, t.channels.width)
                + 4 * t.channels.params for t in tasks]

    @classmethod
    def solve_flops(cls, tasks, method):
        return sum(t.channels.num_experts * method.solve_flops(t.channels.down.out_features, t.channels.width)
                   for t in tasks)
