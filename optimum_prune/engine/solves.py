"""A layer's solves as independent problems, solved in one process or shared by several.

A kind of work (`tasks/`) turns its tasks of one layer into `Problem`s: a Linear or a stack of
Linears reading one tensor, an expert bank, a channel group, an experts module, a MoE block. A
problem is one or more `Piece`s (each expert of a bank; each row block of a matrix whose method
separates by rows, made by ``split``) that can be solved anywhere, and ``take`` / ``finish``, which
apply the pieces' results to the model and the report in one fixed order on every process.

`solve_problems` runs them: in one process (or with ``OPTIMUM_PRUNE_SHARED_SOLVES=0``) piece after
piece, each result applied at once; under several processes each piece is solved by the rank that
`runtime.distributed.assign` gives it by its estimated cost, and the results reach every rank
through `runtime.distributed.exchange_results`. The costs that decide the assignment are the
methods' operation counts (`PruningMethod.solve_flops`) until the pieces of a layer have been timed:
the ranks share the seconds each of their pieces took, and the next layer with the same pieces (the
same shapes, in the same order: every layer of most models) is assigned by those seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..runtime.distributed import assign, exchange_results, gather, rank, solves_shared, world_size


Result = dict[str, torch.Tensor]


@dataclass
class Piece:
    """Work one process does alone: ``solve`` returns its result as named tensors; ``cost`` is its
    estimated floating-point operations (what the assignment balances)."""

    cost: float
    solve: Callable[[], Result]


def _nothing() -> None:
    return None


@dataclass
class Problem:
    """One independent problem of a layer: its ``pieces``; ``take(i, result)`` applies piece ``i``'s
    result (every process, pieces in order), ``finish()`` once all are taken; ``split(n)``, where
    the method's rows separate, the same problem as ``n`` pieces of row blocks (identical result)."""

    pieces: list[Piece]
    take: Callable[[int, Result], None]
    finish: Callable[[], None] = _nothing
    split: Callable[[int], list[Piece]] | None = None
    cost: float = field(init=False)

    def __post_init__(self):
        self.cost = sum(piece.cost for piece in self.pieces)


def row_blocks(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) row ranges of nearly equal size covering ``rows``."""
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def cut(problems: list[Problem], ranks: int) -> None:
    """Cut a problem larger than one rank's share of the layer into row blocks, where its method's
    rows separate (at most one block per rank)."""
    share = sum(problem.cost for problem in problems) / ranks
    for problem in problems:
        if problem.split is not None and len(problem.pieces) == 1 and share > 0 and problem.cost > share:
            problem.pieces = problem.split(min(ranks, math.ceil(problem.cost / share)))


def loads(problems: list[Problem], ranks: int) -> list[float]:
    """Each rank's estimated operations when ``ranks`` processes share ``problems`` (the plan's view)."""
    cut(problems, ranks)
    costs = [piece.cost for problem in problems for piece in problem.pieces]
    found = [0.0] * ranks
    for cost, owner in zip(costs, assign(costs, ranks)):
        found[owner] += cost
    return found


def solve_problems(problems: list[Problem], device: torch.device, times: dict | None = None) -> None:
    """Solve ``problems`` and apply their results: here, or shared by the processes (see the module).
    ``times`` (kept by the caller from layer to layer): the seconds the pieces of earlier layers took."""
    if not solves_shared():
        for problem in problems:
            for index, piece in enumerate(problem.pieces):
                problem.take(index, piece.solve())
            problem.finish()
        return
    ranks = world_size()
    cut(problems, ranks)
    flat = [(problem, index, piece) for problem in problems for index, piece in enumerate(problem.pieces)]
    keys = [(len(flat), position, round(piece.cost)) for position, (_, _, piece) in enumerate(flat)]
    times = {} if times is None else times
    measured = all(key in times for key in keys)
    owners = assign([times[key] if measured else piece.cost for key, (_, _, piece) in zip(keys, flat)], ranks)
    own, spent, error, me = {}, {}, None, rank()
    for position, (_, _, piece) in enumerate(flat):
        if owners[position] == me:
            start = time.perf_counter()
            try:
                own[position] = piece.solve()
            except Exception as err:  # noqa: BLE001 - handed to the other ranks, then raised here
                error = err
                break
            spent[keys[position]] = time.perf_counter() - start
    for position, result in exchange_results(own, owners, error, device):
        problem, index, _ = flat[position]
        problem.take(index, result)
        if index == len(problem.pieces) - 1:
            problem.finish()
    for found in gather(spent):
        times.update(found)
