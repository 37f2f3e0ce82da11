"""The task protocol: one kind of work a prune does to a decoder layer (a Linear sparsified, a
fused expert bank sparsified, a channel group shrunk, experts narrowed, whole experts removed).

A kind is one class, in one module of this package, registered in ``TASK_KINDS`` (``__init__``).
It owns everything that differs between kinds, so that the plan, the engine, the memory and time
estimates, the checkpoint replay and the plan-only report loop over tasks without asking what
they are:

- ``plan_layer`` (with ``applies``): the tasks of one decoder layer, from the config;
- ``hooked`` / ``collector``: what the statistics pass must see (the inputs of some Linears, a
  per-expert or per-block collector of its own);
- ``problems``: the kind's work in one layer as independent `solves.Problem`s — pieces that hand
  the method its 2-D problems, and the steps that write the results (recording the changes for the
  checkpoint under the kind's own keys) — which ``solve`` runs in one process or shares among
  several (`solves.solve_problems`); ``replay``: apply those keys again on resume;
- ``solver_bytes`` / ``checkpoint_bytes`` / ``statistics_banks`` / ``solve_flops``: its terms of
  the memory and time estimates;
- ``label`` / ``target_key``: its lines in the plan-only report.

The engine presents each task's problems to the method as 2-D problems (``engine/problems.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ...configuration import PruningConfig
from ...methods.base import PruningMethod
from ..report import PruneReport
from ..solves import Problem, solve_problems


@dataclass
class LayerRun:
    """What a kind's ``solve`` gets besides its tasks: the method and config of the prune, the
    compute device, the report, the units fixed by the caller (a global method's choice),
    ``note`` (records a layer's changes for the checkpoint's commit) and the seconds the pieces of
    earlier layers took (what several processes assign the next layer's pieces by)."""

    method: PruningMethod
    config: PruningConfig
    device: torch.device
    report: PruneReport
    note: Callable[[dict[str, torch.Tensor]], None]
    kept_units: dict[str, torch.Tensor] | None = None
    solve_times: dict | None = None  # several processes: seconds of earlier layers' pieces (`solves`)
    expert_chunk: range | None = None  # the experts whose statistics this pass collects (None: all)
    carry: dict = field(default_factory=dict)  # what a kind keeps from one expert chunk to the next


class Task:
    """One piece of work on a decoder layer. Subclasses are frozen dataclasses with a ``name``."""

    label: ClassVar[str]  # how the plan-only report counts this kind ("Linears", "channel groups", ...)
    name: str

    # ----------------------------------------------------------- planning
    @classmethod
    def applies(cls, planner) -> bool:
        """Whether this kind plans tasks for the prune ``planner`` (a `LayerPlan`) describes."""
        raise NotImplementedError

    @classmethod
    def plan_layer(cls, planner, layer: nn.Module, layer_name: str, index: int) -> list["Task"]:
        """The tasks of decoder layer ``index`` (refusals of impossible targets raised here)."""
        raise NotImplementedError

    def prunes(self) -> bool:
        """Whether the task removes anything (structured tasks may remove 0 units)."""
        return True

    def linears(self) -> list[nn.Linear]:
        """The Linears the task touches (the plan's coverage)."""
        return []

    def banks(self) -> dict[str, int]:
        """Full name -> weights of the 3-D expert tensors the task touches (the plan's coverage)."""
        return {}

    def free_weights(self) -> int:
        """Weights whose sparsity a sparsity profile may set per layer (unstructured targets)."""
        return 0

    def target_key(self) -> str:
        """The task's line in the plan-only report's count of targets."""
        raise NotImplementedError

    # ----------------------------------------------------------- statistics
    def hooked(self, method: PruningMethod) -> dict[str, tuple[nn.Linear, frozenset]]:
        """The Linears whose inputs the layer's statistics pass must see, with the statistics."""
        return {}

    @classmethod
    def collector(cls, tasks: list["Task"], run: LayerRun):
        """A collector of this kind's own (``next_batch`` / ``remove``) for the statistics pass, or None."""
        return None

    @classmethod
    def statistics_banks(cls, tasks: list["Task"], method: PruningMethod) -> list:
        """The expert banks whose per-expert statistics the pass accumulates (memory estimate)."""
        return []

    # ----------------------------------------------------------- solving
    @classmethod
    def solve(cls, tasks: list["Task"], run: LayerRun, stats: dict, collector) -> None:
        """Solve every task of this kind in one layer and write the results: its `problems`, solved
        here or shared by several processes (`solves.solve_problems`)."""
        solve_problems(cls.problems(tasks, run, stats, collector), run.device, run.solve_times)

    @classmethod
    def problems(cls, tasks: list["Task"], run: LayerRun, stats: dict, collector) -> list[Problem]:
        """The kind's work in one layer as independent problems: ``stats`` maps hooked Linear names
        to their `InputStatistics` (empty without calibration), ``collector`` is what ``collector``
        made. What needs no solve (a task removing nothing) is recorded here, on every process."""
        raise NotImplementedError

    def replay(self, changes: dict[str, torch.Tensor], device: torch.device) -> None:
        """Apply what a checkpoint recorded for this task (the keys its ``solve`` noted)."""
        raise NotImplementedError

    # ----------------------------------------------------------- estimates
    @classmethod
    def solver_bytes(cls, tasks: list["Task"], method: PruningMethod) -> list[int]:
        """The working memory of each problem the kind's solve holds at once."""
        return []

    @classmethod
    def checkpoint_bytes(cls, tasks: list["Task"]) -> int:
        """The layer's new weights held for the checkpoint's commit."""
        return 0

    @classmethod
    def solve_flops(cls, tasks: list["Task"], method: PruningMethod) -> float:
        """Floating-point operations of the kind's solves in one layer."""
        return 0.0


class HeldTask(Task):
    """A task on one object it holds (a channel group, an expert bank, a MoE block, an experts
    module), named as that object is."""

    held: ClassVar[str]  # the field that holds it

    @property
    def name(self) -> str:
        return getattr(self, self.held).name


class TargetTask(Task):
    """A kind that sparsifies tensors to a `Target` (unstructured or N:M): one task per targeted
    tensor of the layer, each with the target the config, an override or a profile gives it."""

    @classmethod
    def applies(cls, planner) -> bool:
        return not planner.structured

    @classmethod
    def candidates(cls, layer: nn.Module, layer_name: str, config: PruningConfig) -> dict[str, tuple[object, int]]:
        """Full name -> (the tensor's holder, its input width) of what the config targets in a layer."""
        raise NotImplementedError

    @classmethod
    def plan_layer(cls, planner, layer, layer_name, index):
        tasks = []
        for name, (holder, width) in cls.candidates(layer, layer_name, planner.config).items():
            target = planner.target_for(name, index)
            target.check_width(width, name)
            tasks.append(cls.of(name, holder, target))
        return tasks

    @classmethod
    def of(cls, name: str, holder, target) -> "TargetTask":
        raise NotImplementedError

    def target_key(self) -> str:
        target = self.target
        return f"{target.pattern}" if target.is_nm else f"{target.sparsity:.0%}"
