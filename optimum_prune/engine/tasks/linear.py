"""A Linear sparsified to a target (unstructured or N:M): the unstructured kind of work."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...methods.base import PruningMethod
from ...patterns import Target
from ...runtime.offload import read_weight, write_weight
from ...structure.layers import select_target_linears
from ..problems import check_finite_result, check_finite_weight
from ..solves import Piece, Problem, row_blocks
from .base import LayerRun, TargetTask


@dataclass(frozen=True)
class LinearTask(TargetTask):
    """Prune the weight of the Linear ``name`` to ``target`` (unstructured or N:M)."""

    label = "Linears"
    name: str
    linear: nn.Linear
    target: Target

    @classmethod
    def candidates(cls, layer, layer_name, config):
        found = select_target_linears(layer, layer_name, config.targets, config.ignore)
        return {name: (linear, linear.in_features) for name, linear in found.items()}

    @classmethod
    def of(cls, name, holder, target):
        return cls(name, holder, target)

    def linears(self):
        return [self.linear]

    def free_weights(self) -> int:
        return self.linear.weight.numel()

    def hooked(self, method):
        return {self.name: (self.linear, method.statistics)}

    @classmethod
    def problems(cls, tasks, run: LayerRun, stats, collector):
        """Linears that read the same tensor (same statistics object) and share a target are one
        problem, handed to the method together; where the method's rows separate (`separable_rows`)
        the problem can be cut into row blocks of the stacked matrix."""
        batches: dict[tuple[int, Target], list[LinearTask]] = {}
        for task in tasks:
            batches.setdefault((id(stats.get(task.name, task.name)), task.target), []).append(task)
        return [cls._problem(members, run, stats.get(members[0].name), target)
                for (_, target), members in batches.items()]

    @classmethod
    def _problem(cls, members: list["LinearTask"], run: LayerRun, found, target: Target) -> Problem:
        method, rows = run.method, [task.linear.out_features for task in members]
        cols = members[0].linear.in_features

        def weights():
            read = [read_weight(task.linear, run.device) for task in members]
            for task, weight in zip(members, read):
                check_finite_weight(task.name, weight)
            return read

        def whole():
            results = method.prune_linears(weights(), found, target)
            for task, result in zip(members, results):
                check_finite_result(method.name, task.name, result.weight)
            return {f"{kind}.{i}": getattr(r, kind) for i, r in enumerate(results) for kind in ("weight", "mask")}

        def block(start: int, stop: int):
            result = method.prune_rows(weights(), found, target, start, stop)
            check_finite_result(method.name, ", ".join(task.name for task in members), result.weight)
            return {"weight": result.weight, "mask": result.mask}

        taken: dict[int, dict] = {}

        def finish():  # one result per Linear (the whole problem), or row blocks of the stack
            parts = [taken.pop(i) for i in sorted(taken)]
            if "weight.0" in parts[0]:
                found = [(parts[0][f"weight.{i}"], parts[0][f"mask.{i}"]) for i in range(len(members))]
            else:
                found = zip(torch.cat([p["weight"] for p in parts]).split(rows),
                            torch.cat([p["mask"] for p in parts]).split(rows))
            for task, (w, m) in zip(members, found):
                written = write_weight(task.linear, w, m)
                run.note({task.name: written})
                # the zeros it holds: the mask's, and any the solve left (a dead input zeroes its column)
                run.report.record(task.name, int((written == 0).sum()), m.numel())

        def split(parts: int):
            return [Piece(method.solve_flops(b - a, cols), lambda a=a, b=b: block(a, b))
                    for a, b in row_blocks(sum(rows), parts)]

        stacked = method.stacks_shared_inputs
        cost = method.solve_flops(sum(rows), cols) if stacked else sum(method.solve_flops(r, cols) for r in rows)
        return Problem([Piece(cost, whole)], taken.__setitem__, finish,
                       split if method.separable_rows(target) else None)

    def replay(self, changes, device) -> None:
        if self.name in changes:
            write_weight(self.linear, changes[self.name])

    @classmethod
    def solve_shapes(cls, tasks: list["LinearTask"], method: PruningMethod) -> list[tuple[int, int]]:
        """(rows, input width) of each problem ``method`` solves for one layer's Linears. A method
        that stacks Linears reading one tensor (`stacks_shared_inputs`) gets one problem per parent
        module, input width and target: q/k/v, gate/up. Which Linears read one tensor is only known
        once the layer runs, so this is an upper bound (an attention block's output projection
        counts with q/k/v; the gated MLP's stack is the larger one in the models we know)."""
        if not method.stacks_shared_inputs:
            return [(t.linear.out_features, t.linear.in_features) for t in tasks]
        stacks: dict[tuple, int] = {}
        for t in tasks:
            key = (t.name.rpartition(".")[0], t.linear.in_features, t.target)
            stacks[key] = stacks.get(key, 0) + t.linear.out_features
        return [(rows, key[1]) for key, rows in stacks.items()]

    @classmethod
    def solver_bytes(cls, tasks, method):
        return [method.workspace_bytes(rows, cols) for rows, cols in cls.solve_shapes(tasks, method)]

    @classmethod
    def checkpoint_bytes(cls, tasks):
        return sum(t.linear.weight.numel() * t.linear.weight.element_size() for t in tasks)

    @classmethod
    def solve_flops(cls, tasks, method):
        return sum(method.solve_flops(rows, cols) for rows, cols in cls.solve_shapes(tasks, method))
