"""The plan of a layer-by-layer prune: which Linear or channel group of every decoder layer gets
which target, built once from the config before any weight changes (bad targets, widths that an
N:M pattern cannot divide, a plan that prunes nothing: refused here), and what share of the
decoder layers' weights it covers.

An entry of the plan is one decoder layer's `LayerTasks`: the tasks every kind of work that applies
to the prune (``tasks.TASK_KINDS``) plans for that layer — a `LinearTask` per targeted Linear and an
`ExpertTask` per targeted fused expert bank (unstructured and N:M patterns), a `GroupTask` per
channel group, an `ExpertChannelTask` per experts module narrowed, an `ExpertDropTask` per MoE block
losing experts (structured).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..configuration import PruningConfig
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..patterns import SparsityPattern, Target, resolve_sparsity
from ..structure.groups import ChannelGroup
from ..structure.layers import first_match, is_router, weight_inventory
from .report import PruneReport
from .tasks import TASK_KINDS, Task


logger = logging.getLogger(__name__)


class LayerTasks:
    """What one decoder layer gets: its tasks, in the order the plan's kinds made them."""

    def __init__(self, tasks: list[Task] | None = None):
        self.tasks = list(tasks or [])

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def by_kind(self) -> dict[type[Task], list[Task]]:
        """The tasks of each kind present, kinds in ``TASK_KINDS`` order (the order they are solved in)."""
        found = {kind: [t for t in self.tasks if type(t) is kind] for kind in TASK_KINDS}
        return {kind: tasks for kind, tasks in found.items() if tasks}

    def prunes_anything(self) -> bool:
        """Whether the layer loses any weight (structured tasks may remove 0 units)."""
        return any(task.prunes() for task in self.tasks)

    def expert_banks(self) -> dict[str, int]:
        """Full name -> weights of the 3-D expert tensors the tasks touch."""
        banks = {}
        for task in self.tasks:
            banks.update(task.banks())
        return banks


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

    def target_for(self, name: str, index: int) -> Target:
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
        return sum(task.free_weights() for task in self.entries[index]
                   if first_match(task.name, self.config.overrides) is None)

    def _build_plan(self) -> list[LayerTasks]:
        kinds = [kind for kind in TASK_KINDS if kind.applies(self)]
        plan = []
        for index, layer in enumerate(self.layers):
            layer_name = f"{self.prefix}.{index}"
            plan.append(LayerTasks([task for kind in kinds for task in kind.plan_layer(self, layer, layer_name, index)]))
        if self.structured and self.method.removes_experts and not any(len(tasks) for tasks in plan):
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
        """A report holding only what the plan covers of the decoder layers' matrices, and naming
        every matrix it leaves out: routers (on purpose), by targets / ignore, or unhandled."""
        covered = set()
        for index, layer in enumerate(self.layers):
            linears = {id(linear) for task in self.entries[index].tasks for linear in task.linears()}
            # a structured layer's budget is a share of all its Linears, those it cannot shrink
            # included (`fixed_params`): they are in the targeted weights, at zero removed
            whole = self.fixed_params[index] > 0
            covered.update(f"{self.prefix}.{index}.{name}.weight" for name, module in layer.named_modules()
                           if id(module) in linears or (whole and isinstance(module, nn.Linear)
                                                        and not is_router(module, name, layer)))
            covered.update(self.entries[index].expert_banks())
        inventory = weight_inventory(self.layers, self.prefix, self.config.targets, self.config.ignore, covered)
        return PruneReport(layer_weights=inventory.total, covered_weights=inventory.covered,
                           unhandled=inventory.unhandled, routers=inventory.routers, ignored=inventory.ignored)

    def module_sparsity(self, names: list[str]) -> float:
        """The structured sparsity of a module known by ``names`` (most specific first): the first
        override that matches one of them, else the config's."""
        override = next((found for name in names if (found := first_match(name, self.config.overrides))), {})
        return resolve_sparsity(override.get("sparsity", self.config.sparsity), self.pattern, f"{names[0]}: ")

    def given_removal(self, group: ChannelGroup) -> int:
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
        """The Linears whose inputs the statistics pass must see, with the statistics to collect."""
        hooked = {}
        for task in tasks:
            hooked.update(task.hooked(self.method))
        return hooked
