"""The passes the layer-wise engine runs over one decoder layer: the first layer's inputs captured,
a layer run over the captured batches (with collectors), and intra-layer error correction (the
layer's Linears pruned stage by stage, each stage with statistics paired against the dense layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.capture import StatisticsCollector, StopForward, check_called, first_output, input_of, run_windows
from ..calibration.statistics import InputStatistics
from ..runtime.distributed import broadcast_layer, reduce_statistics
from ..runtime.offload import dense_snapshot, swapped, to_device
from .activations import ActivationStore
from .tasks import LayerRun, LinearTask


def capture_first_layer_inputs(model: nn.Module, first_layer: nn.Module, calibration: torch.Tensor, batch_size: int,
                               store: ActivationStore):
    """Run the windows until ``first_layer`` and keep its inputs: hidden states in ``store``, the
    other keyword arguments per batch."""
    kwargs = []

    def capture(module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        store.append(hidden)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise StopForward

    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_windows(model, calibration, batch_size)
    finally:
        handle.remove()
    return store, kwargs


def run_layer(layer: nn.Module, inputs, kwargs, device, collectors=(), keep: bool = True):
    """Run ``layer`` on every batch (telling ``collectors`` when a batch ends); with ``keep``, its
    outputs (an `ActivationStore` like ``inputs``)."""
    outputs = inputs.like() if keep else None
    for hidden, kw in zip(inputs, kwargs):
        try:
            out = layer(to_device(hidden, device), **to_device(kw, device))
        except StopForward:
            out = None  # statistics-only pass cut short after the last target Linear
        for collector in collectors:
            collector.next_batch()
        if keep:
            outputs.append(first_output(out).to(hidden.device))
    return outputs


def prune_linears_staged(layer: nn.Module, tasks: list[LinearTask], inputs, kwargs, run: LayerRun) -> dict:
    """Intra-layer error correction: prune the layer's Linears stage by stage in the order the layer
    calls them (a stage = the Linears reading one tensor: q/k/v, then o, then gate/up, then down).
    A stage's statistics pair, batch by batch, its input in the dense layer with its input once the
    earlier stages are pruned (`InputStatistics.update_pair`), so that each Linear compensates the
    error of those before it. Returns the dense weights of the layer's pruned Linears (for `swapped`)."""
    by_name = {task.name: task for task in tasks}
    linears = {task.name: task.linear for task in tasks}
    device, report = run.device, run.report
    dense: dict[nn.Linear, torch.Tensor] = {}
    for stage in call_order(layer, linears, inputs[0], kwargs[0], device):
        first = linears[stage[0]]
        stats = InputStatistics(first.in_features, run.method.statistics, device=device)
        with report.timed("statistics"):
            for hidden, kw in zip(inputs, kwargs):
                if not dense:  # nothing upstream is pruned yet: dense and pruned inputs coincide
                    stats.update(input_of(first, layer, hidden, kw, device))
                    continue
                with swapped(dense):
                    x = input_of(first, layer, hidden, kw, device)
                stats.update_pair(x, input_of(first, layer, hidden, kw, device))
            reduce_statistics([stats])
        stats.check_finite(stage[0])
        for name in stage:
            dense[linears[name]] = dense_snapshot(linears[name])
        with report.timed("solve"):
            LinearTask.solve([by_name[name] for name in stage], run, dict.fromkeys(stage, stats), None)
        broadcast_layer(layer)
    return dense


def call_order(layer: nn.Module, linears: dict[str, nn.Linear], hidden, kw, device) -> list[list[str]]:
    """The target Linears grouped by the tensor they read, groups in the order the layer calls them."""
    collector = StatisticsCollector(linears, dict.fromkeys(linears, frozenset()), stop_when_done=True)
    try:
        run_layer(layer, [hidden], [kw], device, [collector], keep=False)
    finally:
        collector.remove()
    check_called(linears, collector)
    return collector.groups
