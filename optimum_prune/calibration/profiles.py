"""Sparsity profiles: how much of each decoder layer an unstructured prune removes, when the
request is the average over the targeted weights rather than every layer's own sparsity.

- ``uniform``: every layer at the requested sparsity.
- ``owl`` (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): one pass of the calibration
  windows through the dense model collects every targeted Linear's input norms; a layer's outlier
  ratio is the share of its Wanda scores ``|W_ij| * ||X_j||`` above ``owl_threshold`` (the paper's
  M) times the layer's mean score; the ratios are mapped linearly onto sparsities spanning
  ``2 * owl_lambda`` (more outliers: less sparsity) and shifted within ``[layer_sparsity_min,
  layer_sparsity_max]`` so that the average over the targeted weights is the request
  (`allocation.outlier_allocation`). Expert banks take their layer's sparsity; the ratio is
  measured on the layer's Linears.
- ``sensitivity`` (measured): the loss of the model on the first ``sensitivity_samples``
  calibration windows when one decoder layer alone is pruned with a cheap proxy of the method
  (Wanda's scores ``|W_ij| * ||X_j||``, per output row) at a few levels around the request
  (``sparsity`` -0.2, -0.1, 0, +0.1 within the bounds), minus the dense loss, is that layer's
  damage curve; `allocation.allocate` spends the budget over the convexified curves cheapest loss
  per weight first. The layers before the one being measured replay their cached dense outputs,
  so the cost is about ``levels x layers / 2`` forward passes over those windows. Expert banks
  take their layer's sparsity; the curve is measured on the layer's Linears.
- ``sensitivity`` with an N:M pattern and ``layer_patterns``: the same measurement under each
  allowed N:M pattern (Wanda's scores per group of M; ``"dense"`` costs nothing), and each layer
  gets one pattern (`allocation.choose_options`), the mean sparsity at least ``sparsity``.

The dense passes run before any weight changes (a resumed prune measures the same dense model and
gets the same profile).
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import allocate, choose_options, outlier_allocation
from ..patterns import SparsityPattern
from ..runtime.host_memory import releasing_after
from .capture import StatisticsCollector, StopForward, check_called, run_windows
from ..runtime.distributed import reduce_statistics, reduce_sums, world_size
from ..runtime.offload import input_device, read_weight, swapped

SENSITIVITY_OFFSETS = (-0.2, -0.1, 0.0, 0.1)  # levels measured around the requested sparsity


@torch.no_grad()
def dense_input_norms(model: nn.Module, layer_linears: list[dict[str, nn.Linear]], windows: torch.Tensor,
                      batch_size: int, layers: list[nn.Module] = ()) -> dict[str, torch.Tensor]:
    """Every listed Linear's input norms ``||X_j||`` over the calibration windows, on the dense
    model (``layer_linears[i]``: name -> Linear of decoder layer ``i``). Given the decoder
    ``layers``, each forward stops after the last (the final norm and the head's logits are not
    needed) and free host memory is returned after each (`allocator.releasing_after`)."""
    linears = {name: linear for layer in layer_linears for name, linear in layer.items()}
    collector = StatisticsCollector(linears, dict.fromkeys(linears, frozenset({"sq_norm"})), share_inputs=False)
    with releasing_after(list(layers)):  # registered first: runs before the stop on the last layer
        stop = layers[-1].register_forward_hook(_stop_forward) if layers else None
        try:
            run_windows(model, windows, batch_size)
        finally:
            collector.remove()
            if stop is not None:
                stop.remove()
    check_called(linears, collector)
    reduce_statistics(collector.stats)
    return {name: collector.stats[i].input_norm for name, i in collector.group_of.items()}


def _stop_forward(module, args, output):
    raise StopForward


def _scores(linear: nn.Linear, norm: torch.Tensor) -> torch.Tensor:
    """Wanda's scores of ``linear``, float32, on the device of ``norm``."""
    weight = read_weight(linear, norm.device)
    return weight.abs() * norm.to(weight).unsqueeze(0)


def outlier_ratios(layer_linears: list[dict[str, nn.Linear]], norms: dict[str, torch.Tensor],
                   threshold: float) -> torch.Tensor:
    """Per decoder layer, the share of its Linears' Wanda scores above ``threshold`` times their mean."""
    ratios = []
    for layer in layer_linears:
        scores = [_scores(linear, norms[name]).flatten() for name, linear in layer.items()]
        if not scores:
            ratios.append(0.0)
            continue
        flat = torch.cat(scores)
        ratios.append(float((flat > threshold * flat.mean()).to(torch.float64).mean()))
    return torch.tensor(ratios, dtype=torch.float64)


def _proxy_pruned(linear: nn.Linear, norm: torch.Tensor, level: float | SparsityPattern) -> torch.Tensor:
    """``linear``'s weight with the lowest-scoring ``level`` of every output row zeroed (or, for an
    N:M pattern, the lowest-scoring M - N of every M consecutive inputs), in the dtype and on the
    device its forward reads it."""
    scores = _scores(linear, norm)
    current = read_weight(linear, scores.device).clone()  # may be the weight itself
    if isinstance(level, SparsityPattern):
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // level.m, level.m)
        drop = groups.topk(level.m - level.n, dim=2, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True).reshape(rows, cols)
        current.masked_fill_(mask, 0.0)
    else:
        k = int(round(level * scores.shape[1]))
        if k > 0:
            current.scatter_(1, scores.topk(k, dim=1, largest=False).indices, 0.0)
    return current.to(dtype=linear.weight.dtype, device=linear.weight.device)


class LayerReplay:
    """Makes decoder layers ``0 .. stop-1`` return their recorded dense outputs of the current batch
    instead of computing them (the layers after ``stop - 1`` run as usual)."""

    def __init__(self, layers: list[nn.Module]):
        self.layers, self.outputs, self.batch = layers, [], 0

    def record(self, model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
        """Run the dense model over ``batches``, keeping every layer's output; returns the losses."""
        self.outputs = [[] for _ in self.layers]
        hooks = [layer.register_forward_hook(lambda module, args, out, i=i: self.outputs[i].append(out))
                 for i, layer in enumerate(self.layers)]
        try:
            return [_loss(model, batch) for batch in batches]
        finally:
            for hook in hooks:
                hook.remove()

    def losses(self, model: nn.Module, batches: list[torch.Tensor], stop: int) -> list[float]:
        saved = [layer.__dict__.get("forward") for layer in self.layers[:stop]]
        for i, layer in enumerate(self.layers[:stop]):
            layer.forward = lambda *args, i=i, **kwargs: self.outputs[i][self.batch]
        try:
            out = []
            for self.batch, batch in enumerate(batches):
                out.append(_loss(model, batch))
            return out
        finally:
            for layer, forward in zip(self.layers[:stop], saved):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward


def _loss(model: nn.Module, batch: torch.Tensor) -> float:
    batch = batch.to(input_device(model))
    return float(model(input_ids=batch, labels=batch, use_cache=False).loss)


@torch.no_grad()
def sensitivity_curves(model: nn.Module, layers: list[nn.Module], layer_linears: list[dict[str, nn.Linear]],
                       norms: dict[str, torch.Tensor], windows: torch.Tensor, batch_size: int,
                       levels: list[float | SparsityPattern]) -> list[torch.Tensor]:
    """Per decoder layer, the increase of the mean token loss on ``windows`` when that layer's
    Linears alone are pruned by the proxy (Wanda's scores from ``norms``) at each of ``levels``
    (sparsities or N:M patterns)."""
    was_training = model.training
    model.eval()
    batches = list(windows.split(batch_size))
    replay = LayerReplay(layers)
    try:
        with releasing_after(layers):
            dense = sum(replay.record(model, batches)) / len(batches)
            curves = []
            for index, linears in enumerate(layer_linears):
                damage = []
                for level in levels:
                    pruned = {linear: _proxy_pruned(linear, norms[name], level)
                              for name, linear in linears.items()}
                    with swapped(pruned):
                        damage.append(sum(replay.losses(model, batches, index)) / len(batches) - dense)
                curves.append(torch.tensor(damage, dtype=torch.float64))
            reduce_sums(curves)  # several processes: every rank measured its own windows; one profile for all
            return [curve / world_size() for curve in curves]
    finally:
        replay.outputs = []
        model.train(was_training)


def sensitivity_allocation(curves: list[torch.Tensor], levels: list[float], weights: torch.Tensor,
                           sparsity: float, low: float) -> list[float]:
    """Per-layer sparsities from measured damage curves (``curves[i][k]``: damage of layer ``i`` at
    ``levels[k]``, increasing; ``levels[0] == low`` when ``low > 0``): every layer at least ``low``,
    none above the last level, the ``weights``-weighted mean ``sparsity``; what lies above ``low``
    is spent by `allocation.allocate`."""
    r = torch.tensor(levels, dtype=torch.float64)
    if low > 0:  # curves are measured from ``low`` on (levels[0] == low): allocate above it
        shifted = [(r[1:] - low, d[1:] - d[0]) for d in curves]
    else:
        shifted = [(r, d) for d in curves]
    extra = allocate(shifted, weights, (sparsity - low) * float(weights.sum()))
    return [low + share for share in extra]


def layer_sparsities(model: nn.Module, plan, config, windows: torch.Tensor | None) -> list[float] | list[str] | None:
    """Each decoder layer's sparsity under ``config.sparsity_profile`` (None: uniform), or with
    ``config.layer_patterns`` each layer's pattern name. ``plan`` is the uniform `LayerPlan`; the
    budget covers the targeted weights the overrides leave free."""
    if config.sparsity_profile == "uniform":
        return None
    layer_linears = [{name: linear for name, (linear, _) in plan.hooked_linears(tasks).items()}
                     for tasks in plan.entries]
    weights = torch.tensor([float(plan.free_weights(index)) for index in range(len(plan.entries))])
    if float(weights.sum()) == 0:
        return None
    norms = dense_input_norms(model, layer_linears, windows, config.batch_size, plan.layers)
    if config.layer_patterns:
        return mixed_patterns(model, plan, config, windows, layer_linears, norms, weights)
    if config.sparsity_profile == "owl":
        values = outlier_allocation(outlier_ratios(layer_linears, norms, config.owl_threshold), weights,
                                    config.sparsity, config.owl_lambda, config.layer_sparsity_min,
                                    config.layer_sparsity_max)
    else:
        levels = sensitivity_levels(config.sparsity, config.layer_sparsity_min, config.layer_sparsity_max)
        curves = sensitivity_curves(model, plan.layers, layer_linears, norms,
                                    windows[:config.sensitivity_samples], config.batch_size, levels)
        values = sensitivity_allocation(curves, levels, weights, config.sparsity, config.layer_sparsity_min)
    return [round(float(v), 6) for v in values]


def mixed_patterns(model: nn.Module, plan, config, windows: torch.Tensor, layer_linears, norms, weights) -> list[str]:
    """Each decoder layer's N:M pattern (or ``"dense"``) among ``config.pattern`` and
    ``config.layer_patterns``: every layer's loss increase under each N:M choice is measured as for
    the sensitivity profile (dense: none), then `allocation.choose_options` keeps the mean sparsity
    at least ``config.sparsity`` at the least summed loss."""
    choices = [config.pattern] + [p for p in dict.fromkeys(config.layer_patterns) if p != config.pattern]
    measured = [SparsityPattern.parse(p) for p in choices if p != "dense"]
    curves = sensitivity_curves(model, plan.layers, layer_linears, norms, windows[:config.sensitivity_samples],
                                config.batch_size, measured)
    columns = iter(range(len(measured)))
    index = {p: (None if p == "dense" else next(columns)) for p in choices}
    damage = torch.tensor([[0.0 if index[p] is None else float(curve[index[p]]) for p in choices] for curve in curves])
    sparsity = torch.tensor([0.0 if p == "dense" else SparsityPattern.parse(p).implied_sparsity for p in choices])
    return [choices[k] for k in choose_options(damage, sparsity, weights, config.sparsity)]


def sensitivity_levels(sparsity: float, low: float, high: float) -> list[float]:
    """The sparsities at which every layer's damage is measured: ``low`` when above 0, then the
    request plus `SENSITIVITY_OFFSETS`, kept strictly within ``(low, high]``."""
    levels = sorted({round(min(max(sparsity + offset, low), high), 6) for offset in SENSITIVITY_OFFSETS})
    levels = [level for level in levels if level > low]
    return [low, *levels] if low > 0 else levels
