"""The method interface: statistics in, new weights and masks out.

A method never sees hooks, devices, files or the model. The calibration engine hands it, for a
set of Linears that read the same input tensor and share a target, their weights (float32 copies
on the layer's device) and the input statistics it declared in ``statistics``; it returns one
`PruneResult` per weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..errors import PruningError
from .linalg import corrected_target
from ..patterns import Target
from .structured import ExpertUsage, GlobalProblem, StructuredProblem, StructuredResult, keep_top, keep_top_per_group


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class PruneResult:
    weight: torch.Tensor  # new weight, zeros where pruned
    mask: torch.Tensor  # True where pruned


#: A score-and-select pass (a k-th value per row, the mask, the masked write) costs about this many
#: matrix-multiply operations per weight: it is bound by memory, not arithmetic. Fitted to the
#: magnitude and Wanda solves of one decoder layer at 576-4096 wide on 2 CPU threads, 3,600-7,100
#: (benchmarks/scaling.py, docs/results/scaling.md); on a GPU the ratio is not measured.
SELECTION_OPS = 4500.0
#: SparseGPT's column-by-column sweep (the rank-one updates inside each block, the per-block masks),
#: operations per weight at the matrix-multiply rate; fitted as `SELECTION_OPS`, with 1.5 cols^3
#: for the inverse Cholesky factor (estimate / measured 0.77-1.09 at 576-4096 wide).
SWEEP_OPS = 14000.0


class PruningMethod:
    #: The name the registry knows the method by (``optimum_prune.registry``), and shorter ones
    #: that configs accept and turn into it.
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The method's options dataclass; ``PruningConfig.method_kwargs`` is validated against it.
    Options: ClassVar[type] = NoOptions
    #: Pattern families the method can produce: "unstructured", "n:m", "structured".
    supported_patterns: ClassVar[tuple[str, ...]] = ("unstructured", "n:m")
    #: Input statistics the engine must collect: "sq_norm" (per-input sum of squares), "gram".
    statistics: ClassVar[frozenset[str]] = frozenset()

    #: Working copies a solve holds, for the resource guard: (of the in x in Gram matrix, of the
    #: out x in weight), in float32.
    #: (A method whose options change them sets its own in ``__init__``.)
    workspace_copies: tuple[int, int] = (0, 3)
    #: True when `prune_linears` solves Linears that read one input as one stacked matrix (its
    #: working copies are then those of the stacked rows).
    stacks_shared_inputs: ClassVar[bool] = False
    #: True for methods that optimise the whole model at once (policy gradient): the pruner runs
    #: them through `engine.global_search` instead of the layer-by-layer engine.
    is_global: ClassVar[bool] = False
    #: True for methods that remove whole experts of MoE blocks (``structured`` pattern): the plan
    #: holds MoE blocks instead of channel groups and the engine hands the method `ExpertUsage`.
    removes_experts: ClassVar[bool] = False
    #: True for methods that remove whole decoder layers (depth pruning, ``structured`` pattern): the
    #: pruner runs them through `engine.depth`, which hands them one influence per layer.
    removes_layers: ClassVar[bool] = False

    def __init__(self, options=None, dampening: float = 0.01):
        self.options = options if options is not None else self.Options()
        self.dampening = dampening

    def solve_flops(self, rows: int, cols: int) -> float:
        """Operations of one solve of ``rows`` x ``cols`` weights, counted at the matrix-multiply rate
        for the time estimate of a plan-only run (`Pruner.plan`): a score and a selection per weight
        by default (`SELECTION_OPS`)."""
        return SELECTION_OPS * rows * cols

    def workspace_bytes(self, rows: int, cols: int) -> int:
        """Estimated solver memory for ``rows`` x ``cols`` weights (see `workspace_copies`)."""
        grams, weights = self.workspace_copies
        return 4 * (grams * cols * cols + weights * rows * cols)

    @classmethod
    def parse_options(cls, kwargs: dict | None):
        kwargs = dict(kwargs or {})
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            listing = ", ".join(sorted(known)) if known else "none"
            raise PruningError(
                f"Method {cls.name!r} has no option(s) {', '.join(unknown)}; its options are: {listing}."
            )
        return cls.Options(**kwargs)

    @property
    def producer_statistics(self) -> frozenset:
        """Structured methods: statistics of the producers' input (the layer input) they use;
        an empty set spares the engine hooking and accumulating them. Default: ``statistics``."""
        return self.statistics

    @property
    def error_correction(self) -> bool:
        """Whether the engine should prune a layer's Linears stage by stage with paired statistics
        (dense inputs against the inputs of the partly pruned layer; see `InputStatistics.cross`)."""
        return False

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics)

    def prune_linears(self, weights: Sequence[torch.Tensor], stats, target: Target) -> list[PruneResult]:
        """Prune Linears that share one input (and so one set of statistics). Default: one by one."""
        return [self.prune_weight(weight, stats, target) for weight in weights]

    def prune_weight(self, weight: torch.Tensor, stats, target: Target) -> PruneResult:
        raise NotImplementedError

    def separable_rows(self, target: Target) -> bool:
        """Whether each row of `prune_linears`' stacked result depends only on that row of the stacked
        weights (and the statistics), so that `prune_rows` can compute a block of rows alone, with
        the same numbers. Default: no."""
        return False

    def prune_rows(self, weights: Sequence[torch.Tensor], stats, target: Target, start: int, stop: int) -> PruneResult:
        """Rows ``start:stop`` of `prune_linears`' results stacked in order (identical to them), for a
        method whose rows separate (`separable_rows`)."""
        raise NotImplementedError(f"Method {self.name!r} does not prune a block of rows alone.")

    # ------------------------------------------------------------------ structured
    def prune_structured(self, problem: StructuredProblem, remove: int) -> StructuredResult:
        """Remove ``remove`` units of one channel group. Default: drop the lowest `unit_scores`,
        then let `restore` re-fit the consumer on the kept units."""
        keep = keep_top(self.unit_scores(problem), remove)
        return self.restore(problem, keep)

    def unit_scores(self, problem: StructuredProblem) -> torch.Tensor:
        """Importance of every unit (higher is kept)."""
        raise NotImplementedError(f"Method {self.name!r} has no structured variant.")

    def restore(self, problem: StructuredProblem, keep: torch.Tensor) -> StructuredResult:
        """The units ``keep`` with a new consumer weight on their columns, or none (the sliced weight
        stays). Default: none."""
        return StructuredResult(keep)

    # ------------------------------------------------------------------ whole experts (removes_experts)
    def select_experts(self, usage: ExpertUsage, remove: int) -> torch.Tensor:
        """Sorted indices of the experts one MoE block keeps when it loses ``remove`` of them
        (equally many from each routing group). Default: drop the lowest `expert_scores`."""
        return keep_top_per_group(self.expert_scores(usage), remove, usage.groups)

    def expert_scores(self, usage: ExpertUsage) -> torch.Tensor:
        """Importance of every expert (higher is kept)."""
        raise NotImplementedError(f"Method {self.name!r} does not remove experts.")

    # ------------------------------------------------------------------ global methods (is_global)
    def optimise(self, problem: GlobalProblem) -> list[torch.Tensor]:
        """The units every channel group keeps (one 0/1 mask per group), for the whole model at once."""
        raise NotImplementedError(f"Method {self.name!r} is not a global method.")

    def select_layers(self, influence: torch.Tensor, params: torch.Tensor, remove_params: float,
                      candidates: torch.Tensor) -> torch.Tensor:
        """Depth methods: the indices of the decoder layers to remove."""
        raise NotImplementedError(f"Method {self.name!r} does not remove layers.")

    def finishing_step(self) -> tuple[str, bool, dict]:
        """The name of the layer-wise structured method that shrinks the model to the widths
        `optimise` chose, whether it keeps the chosen units (True: it only restores the consumers)
        or picks the units of each width itself (False), and that method's options. The engine
        looks it up."""
        raise NotImplementedError(f"Method {self.name!r} is not a global method.")

    @classmethod
    def delegated_methods(cls, options) -> dict[str, str]:
        """Option name -> the name of another method these options make this one run (the config
        checks that each is a registered layer-wise structured method)."""
        return {}


class GramSolverMethod(PruningMethod):
    """A method that solves Linears sharing an input as one tall matrix against the damped Gram
    matrix ``H`` of that input (rows are independent given ``H``), each matrix keeping its budget.
    With paired statistics (error correction) it solves for the corrected target (`corrected_target`)."""

    statistics = frozenset({"gram"})
    workspace_copies = (3, 4)
    stacks_shared_inputs = True

    def solve_flops(self, rows: int, cols: int) -> float:
        """SparseGPT's cost (the iterative solvers override it or add to it): the inverse Cholesky
        factor of the Gram matrix (three float32 factorisations, ~1.5 cols^3), the block updates
        (2 rows cols^2) and the column sweep (`SWEEP_OPS` per weight)."""
        return 1.5 * float(cols) ** 3 + 2.0 * rows * cols * cols + SWEEP_OPS * rows * cols

    def prune_linears(self, weights, stats, target):
        row_sizes = [w.shape[0] for w in weights]
        H, W = corrected_target(stats, torch.cat(list(weights), 0), self.dampening)
        W, mask = self.solve(W, H, target, row_sizes)
        return [PruneResult(w, m) for w, m in zip(W.split(row_sizes, 0), mask.split(row_sizes, 0))]

    def prune_rows(self, weights, stats, target, start, stop):
        row_sizes = [w.shape[0] for w in weights]
        H, W = corrected_target(stats, torch.cat(list(weights), 0), self.dampening)
        return PruneResult(*self.solve_rows(W, H, target, row_sizes, start, stop))

    def solve(self, W: torch.Tensor, H: torch.Tensor, target: Target, row_sizes: Sequence[int]):
        """New weights and prune mask for the stacked ``W`` (float32, may be modified in place)."""
        raise NotImplementedError

    def solve_rows(self, W: torch.Tensor, H: torch.Tensor, target: Target, row_sizes: Sequence[int], start: int,
                   stop: int):
        """Rows ``start:stop`` of `solve`'s result, computed alone (a method whose rows separate)."""
        raise NotImplementedError(f"Method {self.name!r} does not prune a block of rows alone.")
