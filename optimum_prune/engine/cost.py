"""Time model of a prune, for plan-only runs (`Pruner.plan`, ``--dry-run``).

A layer-wise prune spends its time in three phases per decoder layer (the engine measures them in
`PruneReport.phase_seconds`): the statistics pass (one forward of the calibration tokens through
the layer with hooks accumulating Gram matrices or norms), the solve (each method states its
floating-point operations per problem in `PruningMethod.solve_flops`) and, in sequential mode, the
forward that feeds the next layer. Each phase is counted in floating-point operations and divided
by the matrix-multiply rate measured on the compute device (`gemm_rate`, a fraction of a second);
memory-bound work (selections, element-wise updates) is counted in operations at that rate with
constants fitted on CPU. Linears a method stacks are counted as the stacked problems
(`LinearTask.solve_shapes`). Estimates against measured prunes: docs/results/scaling.md.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .solves import loads


def gemm_rate(device: torch.device, size: int = 1024, seconds: float = 0.25, bursts: int = 1) -> float:
    """float32 matrix-multiply operations per second on ``device``: ``size`` x ``size`` products for
    about ``seconds``, split into ``bursts`` timed runs whose median rate is returned. On a quiet
    machine one 0.25 s run predicts the following seconds within about 3% and a median of five did
    no better (`benchmarks/gemm_rate.py`, docs/results/scaling.md)."""
    if device.type == "meta":
        device = torch.device("cpu")
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    _sync(device)
    rates = []
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / bursts:
                rates.append(2.0 * size**3 * count / elapsed)
                break
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_forward_flops(layer: nn.Module, tokens: int, seqlen: int, hidden: int) -> float:
    """Operations of one forward of ``tokens`` through ``layer``: two per weight and token, plus
    attention's score and value products (``4 x seqlen x hidden`` per token). Fused expert banks
    count the share a token reaches (``top-k / experts``) when the layer says so."""
    dense = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    flops = 2.0 * tokens * dense + 4.0 * tokens * seqlen * hidden
    for module in layer.modules():
        for param in module.parameters(recurse=False):
            if param.dim() == 3:  # a fused expert bank: the routed share of its experts
                share = min(1.0, getattr(module, "top_k", 0) / max(param.shape[0], 1)) or 1.0
                flops += 2.0 * tokens * param.numel() * share
    return flops


def solve_loads(engine, processes: int = 1) -> list[float]:
    """Each process's solve operations over the whole prune when ``processes`` share every layer's
    solves (`solves.loads`): the layer's problems built as the engine builds them, without
    statistics (Linears reading one tensor stacked by their parent module, as `LinearTask.solve_shapes`
    counts them; with error correction each stack is its own stage, shared alone)."""
    from .report import PruneReport
    from .tasks import LayerRun, LinearTask

    found = [0.0] * processes
    for index, tasks in enumerate(engine.plan):
        if not tasks.prunes_anything():
            continue
        run = LayerRun(engine.method, engine.config, engine.compute_device(engine.layers[index]), PruneReport(),
                       lambda changes: None)
        for kind, members in tasks.by_kind().items():
            stacks = {}  # stand-ins for the shared statistics objects the engine hands a stack
            stats = {t.name: stacks.setdefault((t.name.rpartition(".")[0], t.linear.in_features), object())
                     for t in members} if kind is LinearTask and engine.method.stacks_shared_inputs else {}
            problems = kind.problems(members, run, stats, None)
            staged = kind is LinearTask and engine.method.error_correction
            for group in ([[p] for p in problems] if staged else [problems]):
                for rank, load in enumerate(loads(group, processes)):
                    found[rank] += load
    return found


def estimate_phases(engine, num_windows: int, seqlen: int, processes: int = 1,
                    share: float | None = None) -> dict[str, float]:
    """Floating-point operations of each phase of the prune ``engine`` (a `LayerwiseEngine`) would
    run on ``num_windows`` x ``seqlen`` tokens, summed over its decoder layers; with ``processes``,
    those of the busiest process (its share of the windows, its share of each layer's solves) and
    the extra statistics passes of MoE layers calibrated in expert chunks (`engine.expert_chunk`)."""
    method, config = engine.method, engine.config
    num_windows = -(-num_windows // processes)  # the windows of the busiest process
    tokens = num_windows * seqlen if method.needs_calibration else 0
    hidden = getattr(getattr(engine.model, "config", None), "hidden_size", None) or 0
    phases = {"statistics": 0.0, "solve": 0.0, "forward": 0.0}
    forwards = [layer_forward_flops(layer, tokens, seqlen, hidden) for layer in engine.layers]
    for index, forward in enumerate(forwards):
        tasks = engine.plan[index]
        if method.needs_calibration:
            passes = 2 if method.error_correction and not engine.structured else 1  # paired statistics
            passes += expert_passes(engine, index) - 1  # one more pass per further chunk of experts
            phases["statistics"] += passes * forward
            if "gram" in method.statistics:  # upper bound: Linears reading one input share one Gram
                phases["statistics"] += sum(2.0 * tokens * lin.in_features**2
                                            for lin, _ in engine.hooked_linears(tasks).values())
            if config.sequential:
                phases["forward"] += forward
        if not tasks.prunes_anything():
            continue
        solve = sum(kind.solve_flops(members, method) for kind, members in tasks.by_kind().items())
        phases["solve"] += solve
    # the busiest process's share of the solves (``share``: already computed by the caller)
    phases["solve"] *= solve_share(engine, processes) if share is None else share
    if config.sparsity_profile != "uniform" and method.needs_calibration:
        # the profile's dense pass over every layer, and for "sensitivity" every layer pruned alone
        # at 4 levels, the layers from it on run over ``sensitivity_samples`` windows
        phases["profile"] = sum(forwards)
        if config.sparsity_profile == "sensitivity":
            share = min(config.sensitivity_samples, num_windows) / max(num_windows, 1)
            phases["profile"] += 4 * share * sum(sum(forwards[i:]) for i in range(len(forwards)))
    return phases


def expert_passes(engine, index: int) -> int:
    """Statistics passes over decoder layer ``index``: 1, or one per chunk of experts when the memory
    plan calibrates its MoE banks in chunks (`LayerwiseEngine.expert_chunks`)."""
    return len(engine.expert_chunks(engine.plan[index].by_kind()))


def solve_share(engine, processes: int) -> float:
    """The busiest process's share of the solve operations when ``processes`` share them."""
    if processes <= 1:
        return 1.0
    shares = solve_loads(engine, processes)
    return max(shares) / sum(shares) if sum(shares) else 1.0 / processes


def chunk_plan(engine) -> tuple[int, int, int] | None:
    """(experts per statistics pass, experts, passes per MoE layer) when the memory plan calibrates
    MoE layers in chunks of experts; None otherwise."""
    found = [(expert_passes(engine, i), b.num_experts) for i, tasks in enumerate(engine.plan)
             for kind, members in tasks.by_kind().items() for b in kind.statistics_banks(members, engine.method)]
    passes, experts = max(found, default=(1, 0))
    return (engine.expert_chunk, experts, passes) if passes > 1 else None
