"""The passes the layer-wise engine runs over one decoder layer: the first layer's inputs captured,
a layer run over the captured batches (with collectors), and intra-layer error correction (the
layer's Linears pruned stage by stage, each stage with statistics paired against the dense layer).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..calibration.capture import StatisticsCollector, StopForward, check_called, first_output, input_of, run_windows
from ..calibration.statistics import InputStatistics
from ..errors import PruningError, first_line
from ..runtime.distributed import broadcast_layer, reduce_statistics, solves_shared
from ..runtime.offload import dense_snapshot, swapped, to_device
from .activations import ActivationStore
from .tasks import LayerRun, LinearTask


def capture_layer_inputs(model: nn.Module, layers, calibration: torch.Tensor, batch_size: int, store: ActivationStore):
    """Run the windows through the model and keep the first decoder layer's inputs (hidden states
    in ``store``) and, for every decoder layer, the other arguments the model passes it, per batch:
    ``kwargs[i][b]``. Families whose layers differ get each layer's own (Gemma 3: the sliding or
    full mask and the local or global rotary embeddings of the layer's type; Gemma 4: the layer's
    slice of the per-layer inputs). Only the first layer computes; the others pass their input
    through while the model's loop hands them their arguments, and the last stops the forward."""
    kwargs = [[] for _ in layers]
    first_output_of = []  # what a real decoder layer returns (a tensor, or a tuple starting with one)

    def recorder(index: int, layer: nn.Module):
        names = list(inspect.signature(layer.forward).parameters)
        real = layer.forward

        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            # positional arguments after the hidden states (RecurrentGemma passes position_ids and the
            # mask so) are kept by name: every later call passes them as keywords
            kwargs[index].append({**dict(zip(names[1:], args[1:])),
                                  **{k: v for k, v in kw.items() if k != "hidden_states"}})
            if index == 0:
                store.append(hidden)
            if index == len(layers) - 1:
                raise StopForward
            if index == 0:
                out = real(*args, **kw)
                first_output_of[:] = [out]
                return out
            out = first_output_of[0]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate's hooks replace forward too
    try:
        for index, layer in enumerate(layers):
            layer.forward = recorder(index, layer)
        with family_forward(model, "the model's forward over its decoder layers"):
            run_windows(model, calibration, batch_size)
    finally:
        for layer, previous in zip(layers, saved):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
    missing = [index for index, found in enumerate(kwargs) if len(found) != len(kwargs[0])]
    if missing:
        raise PruningError(f"The model's forward did not call decoder layer(s) {missing} on every batch; "
                           f"optimum-prune cannot calibrate this model layer by layer.")
    return store, kwargs


@contextlib.contextmanager
def family_forward(module: nn.Module, what: str):
    """The model's own code runs inside: an error it raises (a family whose layers cannot be run one
    by one with the inputs captured from the first, say) becomes one `PruningError` line naming the
    module's class, not a traceback from inside transformers."""
    try:
        yield
    except (PruningError, StopForward, torch.OutOfMemoryError):
        raise
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError, IndexError, NotImplementedError) as err:
        raise PruningError(f"{type(module).__name__} failed in {what} ({type(err).__name__}: {first_line(err)}): "
                           f"optimum-prune cannot calibrate this model family layer by layer yet; a data-free method "
                           f"(--method magnitude) does not run the model.") from None


def run_layer(layer: nn.Module, inputs, kwargs, device, collectors=(), keep: bool = True):
    """Run ``layer`` on every batch (telling ``collectors`` when a batch ends); with ``keep``, its
    outputs (an `ActivationStore` like ``inputs``)."""
    outputs = inputs.like() if keep else None
    for hidden, kw in zip(inputs, kwargs):
        try:
            with family_forward(layer, "a decoder layer run on its own"):
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
        if not solves_shared():
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
