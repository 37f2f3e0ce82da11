"""The plan of a layer-by-layer prune: which Linear or channel group of every decoder layer gets
which target, built once from the config before any weight changes (bad targets, widths that an
N:M pattern cannot divide, a plan that prunes nothing: refused here), and what share of the
decoder layers' weights it covers.

An entry of the plan is one decoder layer's `LayerTasks`: a `LinearTask` per targeted Linear and
an `ExpertTask` per targeted fused expert bank (unstructured and N:M patterns), or a `GroupTask`
per channel group (structured pruning).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configuration import PruningConfig
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..patterns import SparsityPattern, Target, resolve_sparsity
from ..structure.budget import plan_removals, round_kept
from ..structure.experts import ExpertBank, expert_banks, is_fused_experts
from ..structure.groups import (ChannelGroup, gated_mlp_group, group_selected, has_layout, layer_groups,
                               layout_for)
from ..structure.moe import (ExpertChannels, MoEBlock, check_removal, expert_channel_modules, moe_blocks,
                             tied_shared_experts)
from ..structure.layers import first_match, linear_params, select_target_linears, weight_inventory
from .report import PruneReport


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearTask:
    """Prune the weight of the Linear ``name`` to ``target`` (unstructured or N:M)."""

    name: str
    linear: nn.Linear
    target: Target

    def linears(self) -> list[nn.Linear]:
        return [self.linear]


@dataclass(frozen=True)
class ExpertTask:
    """Prune every expert's matrix of the fused bank ``bank`` to ``target``, each expert with the
    statistics of its own tokens (one 2-D problem per expert)."""

    bank: ExpertBank
    target: Target

    @property
    def name(self) -> str:
        return self.bank.name


@dataclass(frozen=True)
class GroupTask:
    """Remove ``remove`` units (possibly 0) of the channel group ``group`` (structured)."""

    group: ChannelGroup
    remove: int

    @property
    def name(self) -> str:
        return self.group.name

    def linears(self) -> list[nn.Linear]:
        return [p.linear for p in self.group.producers] + [self.group.consumer]


@dataclass(frozen=True)
class ExpertDropTask:
    """Remove ``remove`` whole experts (possibly 0) of the MoE block ``block`` (structured)."""

    block: MoEBlock
    remove: int

    @property
    def name(self) -> str:
        return self.block.name


@dataclass(frozen=True)
class ExpertChannelTask:
    """Remove ``remove`` intermediate channels (possibly 0) of every expert of ``channels`` (structured)."""

    channels: ExpertChannels
    remove: int

    @property
    def name(self) -> str:
        return self.channels.name


@dataclass
class LayerTasks:
    """What one decoder layer gets: Linears to sparsify, or channel groups to shrink."""

    linears: list[LinearTask] = field(default_factory=list)
    groups: list[GroupTask] = field(default_factory=list)
    experts: list[ExpertTask] = field(default_factory=list)
    drops: list[ExpertDropTask] = field(default_factory=list)
    channels: list[ExpertChannelTask] = field(default_factory=list)

    def prunes_anything(self) -> bool:
        """Whether the layer loses any weight (structured groups may remove 0 units)."""
        return (bool(self.linears) or bool(self.experts)
                or any(task.remove > 0 for task in [*self.groups, *self.drops, *self.channels]))

    def expert_banks(self) -> dict[str, int]:
        """Full name -> weights of the 3-D expert tensors the tasks touch."""
        banks = {task.name: task.bank.tensor.numel() for task in self.experts}
        for task in self.drops:
            banks.update({f"{task.block.experts_name}.{name}": p.numel()
                          for name, p in task.block.experts.named_parameters(recurse=False) if p.dim() == 3})
        for task in self.channels:
            banks.update({bank.name: bank.tensor.numel() for bank in (task.channels.up, task.channels.down)})
        return banks

    def covered_weights(self) -> int:
        """Weights of the distinct Linears and expert banks the tasks touch."""
        linears = {id(linear): linear for task in [*self.linears, *self.groups] for linear in task.linears()}
        return sum(linear.weight.numel() for linear in linears.values()) + sum(self.expert_banks().values())


class LayerPlan:
    """The targets of every decoder layer (``entries[i]``), the parameters of each layer that a
    structured prune cannot shrink (``fixed_params[i]``) and the weights covered (``coverage``).

    ``removals`` (channel group name -> units to remove) replaces the uniform structured plan
    (widths decided elsewhere, e.g. by a global method); ``kept_units`` (group name -> indices of
    the units to keep) fixes the units too."""

    def __init__(self, model: nn.Module, prefix: str, layers: nn.ModuleList, config: PruningConfig,
                 method: PruningMethod, removals: dict[str, int] | None = None,
                 kept_units: dict[str, torch.Tensor] | None = None, layer_sparsity: list[float] | None = None,
                 warn: bool = True, layer_patterns: list[str] | None = None):
        """``layer_sparsity`` (one value per decoder layer, from a sparsity profile) replaces the
        config's sparsity for every targeted tensor of that layer that no override fixes;
        ``layer_patterns`` (an N:M pattern or ``"dense"`` per layer) replaces its pattern."""
        self.model, self.prefix, self.layers = model, prefix, layers
        self.layer_patterns = layer_patterns
        if layer_patterns is not None:
            layer_sparsity = [0.0 if p == "dense" else SparsityPattern.parse(p).implied_sparsity for p in layer_patterns]
        self.layer_sparsity = layer_sparsity
        self.config, self.method = config, method
        self.kept_units = kept_units
        self.removals = dict(removals or {}) if kept_units is not None else removals
        self.pattern = config.parsed_pattern
        self.structured = self.pattern.kind == "structured"
        self.fixed_params = [0] * len(layers)
        self.entries = self._build_plan()
        self.coverage = self._measure_coverage()
        note = self.coverage.unhandled_note(prefix) if warn else None
        if note:
            logger.warning(note)

    def _target_for(self, name: str, index: int) -> Target:
        override = first_match(name, self.config.overrides) or {}
        if self.layer_patterns is not None and not override:
            chosen = self.layer_patterns[index]
            if chosen == "dense":  # targeted, nothing removed: counted in the report at 0
                return Target(0.0, SparsityPattern.parse("unstructured"))
            pattern = SparsityPattern.parse(chosen)
            return Target(pattern.implied_sparsity, pattern)
        pattern = SparsityPattern.parse(override.get("pattern", self.config.pattern))
        default = self.config.sparsity if self.layer_sparsity is None else self.layer_sparsity[index]
        if pattern.kind == "nm":  # N:M fixes it (the config's sparsity may be a mixed profile's average)
            default = None
        sparsity = override.get("sparsity", default if "pattern" not in override else None)
        return Target(resolve_sparsity(sparsity, pattern, f"overrides for {name}: "), pattern)

    def free_weights(self, index: int) -> int:
        """Weights of layer ``index``'s targeted tensors that no override fixes (what a sparsity
        profile spreads the budget over)."""
        tasks = self.entries[index]
        return (sum(t.linear.weight.numel() for t in tasks.linears if first_match(t.name, self.config.overrides) is None)
                + sum(t.bank.tensor.numel() for t in tasks.experts if first_match(t.name, self.config.overrides) is None))

    def _build_plan(self) -> list[LayerTasks]:
        plan = []
        for index, layer in enumerate(self.layers):
            layer_name = f"{self.prefix}.{index}"
            if self.structured and self.method.removes_experts:
                plan.append(self._expert_drop_entry(layer, layer_name))
                continue
            if self.structured:
                plan.append(self._structured_entry(layer, layer_name, index))
                continue
            linears = select_target_linears(layer, layer_name, self.config.targets, self.config.ignore)
            tasks = LayerTasks()
            for name, linear in linears.items():
                target = self._target_for(name, index)
                target.check_width(linear.in_features, name)
                tasks.linears.append(LinearTask(name, linear, target))
            for name, bank in expert_banks(layer, layer_name, self.config.targets, self.config.ignore).items():
                target = self._target_for(name, index)
                target.check_width(bank.in_features, name)
                tasks.experts.append(ExpertTask(bank, target))
            plan.append(tasks)
        if self.structured and self.method.removes_experts and not any(tasks.drops for tasks in plan):
            raise PruningError(
                f"{self.method.name} removes experts of mixture-of-experts blocks, and no decoder layer of this "
                f"{getattr(self.model.config, 'model_type', type(self.model).__name__)} model has one (matching "
                f"targets={self.config.targets} ignore={self.config.ignore}); use a channel method such as fasp."
            )
        if not any(tasks.prunes_anything() for tasks in plan):
            raise PruningError(
                f"No {'channel group' if self.structured else 'Linear'} inside the decoder layers ({self.prefix}.N) "
                f"matches targets={self.config.targets} ignore={self.config.ignore} with a non-zero sparsity; "
                f"widen targets, shorten ignore or raise the sparsity."
            )
        return plan

    def _measure_coverage(self) -> PruneReport:
        """A report holding only what the plan covers of the decoder layers' weights."""
        coverage = PruneReport()
        for index, layer in enumerate(self.layers):
            total, unhandled = weight_inventory(layer, f"{self.prefix}.{index}", self.config.targets, self.config.ignore)
            coverage.layer_weights += total
            covered = set(self.entries[index].expert_banks())
            coverage.unhandled.update({name: n for name, n in unhandled.items() if name not in covered})
            coverage.covered_weights += self.entries[index].covered_weights()
        return coverage

    def _module_sparsity(self, names: list[str]) -> float:
        """The structured sparsity of a module known by ``names`` (most specific first): the first
        override that matches one of them, else the config's."""
        override = next((found for name in names if (found := first_match(name, self.config.overrides))), {})
        return resolve_sparsity(override.get("sparsity", self.config.sparsity), self.pattern, f"{names[0]}: ")

    def _expert_drop_entry(self, layer, layer_name: str) -> LayerTasks:
        """The MoE blocks of one layer with the number of experts each loses: ``sparsity`` (or the
        block's or layer's override) is the fraction of the block's routed experts removed."""
        tasks = LayerTasks()
        for block in moe_blocks(layer, layer_name, self.config.targets, self.config.ignore):
            sparsity = self._module_sparsity([block.name, layer_name])
            remove = math.floor(sparsity * block.num_experts / block.groups + 0.5) * block.groups
            check_removal(block, remove)
            tasks.drops.append(ExpertDropTask(block, remove))
        return tasks

    def _expert_channel_entry(self, layer, layer_name: str, index: int) -> LayerTasks:
        """The fused experts modules of one layer (a MoE family without channel groups) with the
        channels every expert loses: ``sparsity`` (or an override on the experts module, its block or
        the layer) of each expert's intermediate channels, the kept count rounded to
        ``channel_multiple``. Shared experts whose width the config ties to the experts' lose
        channels in proportion (a channel group); attention, dense MLPs and other shared experts
        stay as they are."""
        tasks = LayerTasks()
        for channels in expert_channel_modules(layer, layer_name, self.config.targets, self.config.ignore):
            sparsity = self._module_sparsity([channels.name, channels.name.rsplit(".", 1)[0], layer_name])
            width = channels.width
            kept = max(1, width - math.floor(sparsity * width + 0.5))
            kept = round_kept(kept, width, self.config.channel_multiple)
            tasks.channels.append(ExpertChannelTask(channels, width - kept))
            block_name = channels.name.rsplit(".", 1)[0]
            block = layer.get_submodule(block_name[len(layer_name) + 1:]) if block_name != layer_name else layer
            for child, mlp in tied_shared_experts(block, width, self.model.config):
                group = gated_mlp_group(f"{block_name}.{child}", index, mlp)
                tasks.groups.append(GroupTask(group, (width - kept) * group.units // width))
        return tasks

    def _structured_entry(self, layer, layer_name: str, index: int) -> LayerTasks:
        """Channel groups of one layer with the number of units each removes (possibly 0)."""
        if not has_layout(self.model):
            if not any(is_fused_experts(module) for module in self.model.modules()):
                layout_for(self.model)  # the family's one-line refusal
            return self._expert_channel_entry(layer, layer_name, index)
        groups = layer_groups(self.model, layer, layer_name, index)
        cfg = self.config
        excluded, fixed = set(), {}
        for group in groups:
            if not group_selected(group, cfg.targets, cfg.ignore):
                excluded.add(group.name)
            elif (override := first_match(group.name, cfg.overrides)) is not None:
                fixed[group.name] = resolve_sparsity(override.get("sparsity"), self.pattern, f"overrides[{group.name}]: ")
        layer_override = first_match(layer_name, cfg.overrides) or {}
        sparsity = resolve_sparsity(layer_override.get("sparsity", cfg.sparsity), self.pattern, f"{layer_name}: ")
        layer_params = linear_params(layer)
        self.fixed_params[index] = layer_params - sum(g.params for g in groups)  # Linears that cannot shrink
        if self.removals is not None:  # widths decided by the caller
            return LayerTasks(groups=[GroupTask(g, self._given_removal(g)) for g in groups])
        removals = plan_removals(groups, sparsity, fixed, excluded, layer_params, cfg.channel_multiple)
        return LayerTasks(groups=[GroupTask(g, removals[g.name]) for g in groups])

    def _given_removal(self, group: ChannelGroup) -> int:
        if self.kept_units is not None and group.name in self.kept_units:
            keep = self.kept_units[group.name]
            if keep.numel() < 1 or keep.numel() > group.units or int(keep.max()) >= group.units:
                raise PruningError(f"kept_units[{group.name!r}] must index 1..{group.units} of its {group.units} units.")
            return group.units - keep.numel()
        remove = self.removals.get(group.name, 0)
        if not 0 <= remove < group.units:
            raise PruningError(f"removals[{group.name!r}] must be in [0, {group.units}), got {remove}.")
        return remove

    def hooked_linears(self, tasks: LayerTasks) -> dict[str, tuple[nn.Linear, frozenset]]:
        """The Linears whose inputs the statistics pass must see, with the statistics to collect.
        Producers of channel groups are hooked only if the method uses their input statistics."""
        hooked = {}
        for task in tasks.groups:
            if task.remove == 0:
                continue
            group = task.group
            if self.method.producer_statistics:
                hooked.update({p.name: (p.linear, self.method.producer_statistics) for p in group.producers})
            hooked[group.consumer_name] = (group.consumer, self.method.statistics)
        for task in tasks.linears:
            hooked[task.name] = (task.linear, self.method.statistics)
        return hooked
