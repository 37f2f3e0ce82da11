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

The dense pass runs before any weight changes (a resumed prune measures the same dense model and
gets the same profile).
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import outlier_allocation
from .capture import StatisticsCollector, check_called, run_windows
from .distributed import reduce_statistics
from .offload import read_weight


@torch.no_grad()
def outlier_ratios(model: nn.Module, layer_linears: list[dict[str, nn.Linear]], windows: torch.Tensor,
                   batch_size: int, threshold: float) -> torch.Tensor:
    """Per decoder layer, the share of its Linears' Wanda scores above ``threshold`` times their
    mean, on the dense model's inputs (``layer_linears[i]``: name -> Linear of layer ``i``)."""
    linears = {name: linear for layer in layer_linears for name, linear in layer.items()}
    collector = StatisticsCollector(linears, dict.fromkeys(linears, frozenset({"sq_norm"})), share_inputs=False)
    try:
        run_windows(model, windows, batch_size)
    finally:
        collector.remove()
    check_called(linears, collector)
    reduce_statistics(collector.stats)
    stats = {name: collector.stats[i] for name, i in collector.group_of.items()}
    ratios = []
    for layer in layer_linears:
        scores = []
        for name, linear in layer.items():
            weight = read_weight(linear, stats[name].sq_sum.device)
            scores.append((weight.abs() * stats[name].input_norm.to(weight).unsqueeze(0)).flatten())
        if not scores:
            ratios.append(0.0)
            continue
        flat = torch.cat(scores)
        ratios.append(float((flat > threshold * flat.mean()).to(torch.float64).mean()))
    return torch.tensor(ratios, dtype=torch.float64)


def layer_sparsities(model: nn.Module, plan, config, windows: torch.Tensor | None) -> list[float] | None:
    """Each decoder layer's sparsity under ``config.sparsity_profile`` (None: uniform). ``plan``
    is the uniform `LayerPlan`; the budget covers the targeted weights the overrides leave free."""
    if config.sparsity_profile == "uniform":
        return None
    layer_linears = [{task.name: task.linear for task in tasks.linears} for tasks in plan.entries]
    ratios = outlier_ratios(model, layer_linears, windows, config.batch_size, config.owl_threshold)
    weights = torch.tensor([float(plan.free_weights(index)) for index in range(len(plan.entries))])
    if float(weights.sum()) == 0:
        return None
    values = outlier_allocation(ratios, weights, config.sparsity, config.owl_lambda,
                                config.layer_sparsity_min, config.layer_sparsity_max)
    return [round(float(v), 6) for v in values]
