"""A fused mixture-of-experts bank sparsified to a target, expert by expert: each expert's
matrix is its own 2-D problem, with the statistics of the tokens routed to it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ...calibration.capture import ExpertCollector
from ...patterns import Target
from ...runtime.distributed import reduce_statistics
from ...runtime.offload import commit_value
from ...structure.experts import ExpertBank, expert_banks
from ..problems import SolvedBank, expert_bank_problem
from .base import HeldTask, LayerRun, TargetTask


@dataclass(frozen=True)
class ExpertTask(HeldTask, TargetTask):
    """Prune every expert's matrix of the fused bank ``bank`` to ``target``, each expert with the
    statistics of its own tokens (one 2-D problem per expert)."""

    label = "expert banks"
    held = "bank"
    bank: ExpertBank
    target: Target

    @classmethod
    def candidates(cls, layer, layer_name, config):
        found = expert_banks(layer, layer_name, config.targets, config.ignore)
        return {name: (bank, bank.in_features) for name, bank in found.items()}

    @classmethod
    def of(cls, name, holder, target):
        return cls(holder, target)

    def banks(self):
        return {self.name: self.bank.tensor.numel()}

    def free_weights(self) -> int:
        return self.bank.tensor.numel()

    @classmethod
    def collector(cls, tasks, run: LayerRun):
        return ExpertCollector([t.bank for t in tasks], run.method.statistics, run.device,
                               all_tokens=run.config.expert_calibration == "all", experts=run.expert_chunk)

    @classmethod
    def statistics_banks(cls, tasks, method):
        return [t.bank for t in tasks]

    @classmethod
    def problems(cls, tasks, run: LayerRun, stats, collector):
        """Each bank one problem, each expert's matrix one piece (`expert_bank_problem`), with the
        statistics of its tokens (none for a method without calibration)."""
        if collector is not None:
            collector.check()
            reduce_statistics([s for task in tasks for s in collector.stats[task.name] if s is not None])
        chunk = None if collector is None else collector.experts  # several passes: this pass's experts
        return [expert_bank_problem(run.method, task.bank, task.target,
                                    None if collector is None else collector.stats[task.name],
                                    run.config.min_expert_tokens, run.device, partial(cls._record, task, run),
                                    chunk, run.carry.setdefault(task.name, SolvedBank()))
                for task in tasks]

    def _record(self, run: LayerRun, solved: SolvedBank) -> None:
        run.note({self.name: solved.stored})
        run.report.record(self.name, solved.pruned, solved.total)
        run.report.expert_matrices += self.bank.num_experts
        if solved.fallbacks:
            run.report.expert_fallbacks[self.name] = solved.fallbacks

    def replay(self, changes, device) -> None:
        if self.name in changes:
            commit_value(self.bank.module, self.bank.param, changes[self.name])

    @classmethod
    def solver_bytes(cls, tasks, method):
        return [method.workspace_bytes(t.bank.out_features, t.bank.in_features) for t in tasks]

    @classmethod
    def checkpoint_bytes(cls, tasks):
        return sum(t.bank.tensor.numel() * t.bank.tensor.element_size() for t in tasks)

    @classmethod
    def solve_flops(cls, tasks, method):
        return sum(t.bank.num_experts * method.solve_flops(t.bank.out_features, t.bank.in_features) for t in tasks)
