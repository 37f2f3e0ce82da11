"""The sequential layer engine: the walk over the decoder layers. What each layer gets is planned
in `plan.py`, hooks live in `capture.py`, devices and offload stores in `offload.py`.

1. Run the calibration windows through the model until the first decoder layer and capture its
   inputs (hidden states and the keyword arguments the layer needs).
2. For each decoder layer: bring it onto the compute device, hook its target Linears and run the
   captured inputs through it to accumulate the statistics the method declared; hand each group
   of Linears that read the same tensor to the method; write the new weights back; run the layer
   again so that the next layer sees the outputs of the *pruned* layer (``sequential=True``), or
   keep the dense outputs of the statistics pass (``sequential=False``, one pass per layer).

Fused mixture-of-experts banks are pruned expert by expert: the statistics pass also feeds an
`ExpertCollector` (each expert's inputs, from the tokens routed to it), and every expert's matrix
is handed to the method as its own 2-D problem (read and written one expert at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration import PruningConfig
from ..patterns import Target
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..methods.structured import ExpertUsage, StructuredResult
from ..structure.layers import find_decoder_layers
from ..structure.moe import narrow_experts, remove_experts
from ..structure.shrink import describe_widths, shrink_group
from .activations import ActivationStore, check_place
from .capture import (ExpertCollector, ExpertUsageCollector, StatisticsCollector, StopForward, check_called, first_output, input_of,
                      run_windows)
from .checkpoint import LayerCheckpoint, fingerprint
from .allocator import release_host_memory
from .distributed import broadcast_layer, reduce_statistics, reduce_sums
from .plan import ExpertChannelTask, ExpertDropTask, ExpertTask, LayerPlan, LinearTask
from .offload import (commit_value, current_value, dense_snapshot, execution_device, onloaded, read_weight,
                      set_param, swapped, to_device, write_weight)
from .problems import (apply_to_group, check_finite_result, check_finite_weight, read_group_problem,
                       solve_expert_bank, solve_expert_channels)
from .report import PruneReport
from .statistics import InputStatistics


logger = logging.getLogger(__name__)


class LayerwiseEngine:
    """Runs one prune of ``model`` with ``method`` as described by ``config``."""

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        method: PruningMethod,
        device: str | torch.device | None = None,
        progress: bool = True,
        activations: str = "device",
        activation_folder: str | os.PathLike | None = None,
        removals: dict[str, int] | None = None,
        kept_units: dict[str, torch.Tensor] | None = None,
    ):
        """``removals`` (channel group name -> units to remove) replaces the uniform structured plan
        (widths decided elsewhere, e.g. by a global method); ``kept_units`` (group name -> indices
        of the units to keep) fixes the units too, and the method only restores the consumers."""
        self.model = model
        self.kept_units = kept_units
        self.activations = check_place(activations)  # where the hidden states wait between layers
        self.activation_folder = activation_folder
        self.config = config
        self.method = method
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.prefix, self.layers = find_decoder_layers(model)
        self.structured = config.parsed_pattern.kind == "structured"
        # what the current layer changed, for the checkpoint's commit; None without a checkpoint
        # (the new weights of a whole layer: not held when nobody reads them)
        self._changes: dict[str, torch.Tensor] | None = None
        self._use_plan(LayerPlan(model, self.prefix, self.layers, config, method, removals, kept_units))
        if method.error_correction and not config.sequential and any(t.experts for t in self.plan):
            raise PruningError(f"{method.name} with error correction prunes fused MoE experts only in sequential mode; "
                               f"drop sequential=False (--one-pass) or set error_correction=false.")

    def _use_plan(self, planned: LayerPlan) -> None:
        self.planned = planned
        self.plan, self.coverage, self._fixed_params = planned.entries, planned.coverage, planned.fixed_params
        self.hooked_linears = planned.hooked_linears
        self.layer_sparsity = planned.layer_sparsity
        self.layer_patterns = planned.layer_patterns

    def use_layer_sparsity(self, values: list[float] | list[str] | None) -> None:
        """Give every decoder layer its own sparsity (a sparsity profile; None: the config's), or
        its own N:M pattern / ``"dense"`` when ``values`` are pattern names (mixed patterns)."""
        if values is None:
            return
        patterns = values if all(isinstance(v, str) for v in values) else None
        self._use_plan(LayerPlan(self.model, self.prefix, self.layers, self.config, self.method,
                                 layer_sparsity=None if patterns else values, layer_patterns=patterns, warn=False))

    def compute_device(self, layer: nn.Module) -> torch.device:
        """Where ``layer`` is calibrated and solved: ``device`` if given, else where it executes."""
        return self.device or execution_device(layer, torch.device("cpu"))

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def run(self, calibration: torch.Tensor | None, checkpoint: LayerCheckpoint | None = None) -> PruneReport:
        """Prune every layer; with ``checkpoint``, commit each finished layer to it (and continue
        from it when it holds an earlier, interrupted run of the same prune)."""
        start = time.perf_counter()
        report = PruneReport(layer_weights=self.coverage.layer_weights, covered_weights=self.coverage.covered_weights,
                             unhandled=dict(self.coverage.unhandled), layer_sparsity=self.layer_sparsity,
                             layer_patterns=self.layer_patterns)
        inputs = kwargs = None
        if self.method.needs_calibration:
            if calibration is None or calibration.numel() == 0:
                raise PruningError(f"Method {self.method.name!r} needs calibration data; none was given.")
            inputs, kwargs = self._capture_first_layer_inputs(calibration)
        first = 0
        if checkpoint is not None:
            first, inputs, elapsed = self._resume(checkpoint, calibration, inputs, report)
            start -= elapsed
        last = len(self.layers) - 1
        bar = tqdm(range(first, len(self.layers)), total=len(self.layers), initial=first, desc=f"{self.method.name}",
                   unit="layer", disable=not self.progress)
        try:
            for index in bar:
                self._changes = {} if checkpoint is not None else None
                outputs = self._prune_layer(index, inputs, kwargs, report)
                if inputs is not None:
                    inputs.close()
                inputs = outputs
                release_host_memory()
                if checkpoint is not None:
                    checkpoint.commit(index, self._changes, inputs if index < last else None, report.to_dict(),
                                      time.perf_counter() - start)
                bar.set_postfix(sparsity=f"{report.overall_sparsity:.3f}")
        finally:
            if inputs is not None:
                inputs.close()
        if self.structured:
            describe_widths(self.model)
        report.seconds = time.perf_counter() - start
        return report

    def _prune_layer(self, index: int, inputs, kwargs, report: PruneReport):
        """Prune decoder layer ``index``; returns the inputs of the next layer (None without data)."""
        layer = self.layers[index]
        tasks = self.plan[index]
        needs_data = self.method.needs_calibration
        device = self.compute_device(layer)
        with onloaded(layer, device):
            if tasks.drops:
                return self._drop_experts(layer, tasks.drops, inputs, kwargs, device, report)
            if needs_data and not tasks.prunes_anything():  # nothing to prune here: one pass for the next layer's inputs
                if self.structured:  # count the layer's parameters in the report
                    self._prune_structured(index, {}, report, device)
                return self._run_layer(layer, inputs, kwargs, device, None, keep=True)
            if needs_data and self.method.error_correction and not self.structured:
                dense = self._prune_linears_staged(layer, tasks.linears, inputs, kwargs, device, report)
                if tasks.experts:  # experts last, on the inputs of the layer with its Linears pruned
                    experts = self._expert_collector(tasks, device)
                    try:
                        self._run_layer(layer, inputs, kwargs, device, [experts], keep=False)
                    finally:
                        experts.remove()
                    self._prune_experts(tasks.experts, experts, report, device)
                # the next layer sees the pruned layer (sequential) or the dense one
                with contextlib.nullcontext() if self.config.sequential else swapped(dense), report.timed("forward"):
                    return self._run_layer(layer, inputs, kwargs, device, None, keep=True)
            stats, outputs = {}, None
            if needs_data:
                keep = not self.config.sequential  # one-pass mode feeds the next layer from this pass
                hooked = self.hooked_linears(tasks)
                linears = {name: linear for name, (linear, _) in hooked.items()}
                kinds = {name: stat_kinds for name, (_, stat_kinds) in hooked.items()}
                # a pass that feeds experts runs to the end (they come after the Linears)
                collector = StatisticsCollector(linears, kinds,
                                                stop_when_done=not keep and not tasks.experts and not tasks.channels)
                experts = self._expert_collector(tasks, device)
                try:
                    with report.timed("statistics"):
                        outputs = self._run_layer(layer, inputs, kwargs, device, [collector, experts], keep=keep)
                finally:
                    collector.remove()
                    if experts is not None:
                        experts.remove()
                check_called(linears, collector)
                reduce_statistics(collector.stats)  # several processes: statistics of all their windows
                stats = {name: collector.stats[i] for name, i in collector.group_of.items()}
                for i, names in enumerate(collector.groups):
                    collector.stats[i].check_finite(names[0])
            with report.timed("solve"):
                if self.structured:
                    self._prune_structured(index, stats, report, device)
                    self._narrow_experts(tasks.channels, experts if needs_data else None, report, device)
                else:
                    self._prune_linears(tasks.linears, stats, report, device)
                    self._prune_experts(tasks.experts, experts if needs_data else None, report, device)
            broadcast_layer(layer)  # several processes: rank 0's weights everywhere
            if needs_data and self.config.sequential:
                with report.timed("forward"):
                    outputs = self._run_layer(layer, inputs, kwargs, device, None, keep=True)
        return outputs

    def _resume(self, checkpoint: LayerCheckpoint, calibration, inputs, report: PruneReport):
        """Validate ``checkpoint`` and replay what it holds: (first layer to prune, its inputs, seconds spent)."""
        state = checkpoint.begin(fingerprint(self.model, self.config, calibration), len(self.layers))
        if state is None:
            return 0, inputs, 0.0
        done = state["next_layer"]
        for index in range(done):
            changes, rng = checkpoint.layer_changes(index)
            layer = self.layers[index]
            device = self.compute_device(layer)
            with onloaded(layer, device):
                self._replay(index, changes, device)
            torch.set_rng_state(rng)
        report.load_dict(state["report"])
        if inputs is not None and done < len(self.layers):
            restored, device = inputs.like(), inputs[0].device
            for x in checkpoint.inputs() or ():
                restored.append(x.to(device))
            if len(restored) != len(inputs):
                restored.close()
                raise PruningError(f"The checkpoint in {checkpoint.directory} has no usable layer inputs; start over.")
            inputs.close()
            inputs = restored
        return done, inputs, float(state.get("seconds", 0.0))

    def _replay(self, index: int, changes: dict[str, torch.Tensor], device) -> None:
        """Apply what a checkpoint recorded for layer ``index`` to the (unpruned) layer."""
        tasks = self.plan[index]
        for task in tasks.groups:
            if f"{task.name}.keep" in changes:
                _, weights = read_group_problem(task.group, device, None, None)
                shrink_group(task.group, changes[f"{task.name}.keep"], weights, changes.get(f"{task.name}.consumer"),
                             set_param=set_param)
        for task in tasks.channels:
            channels = task.channels
            if f"{task.name}.{channels.down.param}" in changes:
                bias = channels.bias(channels.up)
                narrow_experts(channels, changes[f"{task.name}.{channels.up.param}"],
                               changes[f"{task.name}.{channels.down.param}"],
                               changes.get(f"{task.name}.{bias}") if bias else None, set_param)
        for task in tasks.drops:
            if f"{task.name}.keep_experts" in changes:
                remove_experts(task.block, changes[f"{task.name}.keep_experts"], set_param, read=current_value)
        for task in tasks.linears:
            if task.name in changes:
                write_weight(task.linear, changes[task.name])
        for task in tasks.experts:
            if task.name in changes:
                commit_value(task.bank.module, task.bank.param, changes[task.name])

    def _capture_first_layer_inputs(self, calibration: torch.Tensor):
        inputs, kwargs = ActivationStore(self.activations, self.activation_folder), []

        def capture(module, args, kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            inputs.append(hidden)
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise StopForward

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            run_windows(self.model, calibration, self.config.batch_size)
        finally:
            handle.remove()
        return inputs, kwargs

    def _run_layer(self, layer, inputs, kwargs, device, collectors, keep):
        """Run ``layer`` on every batch (telling ``collectors`` when a batch ends); with ``keep``,
        its outputs (an `ActivationStore` like ``inputs``)."""
        outputs = inputs.like() if keep else None
        for hidden, kw in zip(inputs, kwargs):
            try:
                out = layer(to_device(hidden, device), **to_device(kw, device))
            except StopForward:
                out = None  # statistics-only pass cut short after the last target Linear
            for collector in collectors or ():
                if collector is not None:
                    collector.next_batch()
            if keep:
                outputs.append(first_output(out).to(hidden.device))
        return outputs

    def _prune_linears_staged(self, layer, tasks: list[LinearTask], inputs, kwargs, device,
                              report: PruneReport) -> dict:
        """Intra-layer error correction: prune the layer's Linears stage by stage in the order the
        layer calls them (a stage = the Linears reading one tensor: q/k/v, then o, then gate/up,
        then down). A stage's statistics pair, batch by batch, its input in the dense layer with its
        input once the earlier stages are pruned (`InputStatistics.update_pair`), so that each
        Linear compensates the error of those before it. Returns the dense weights of the layer's
        pruned Linears (for `swapped`)."""
        by_name = {task.name: task for task in tasks}
        linears = {task.name: task.linear for task in tasks}
        stages = self._call_order(layer, linears, inputs[0], kwargs[0], device)
        dense: dict[nn.Linear, torch.Tensor] = {}
        for stage in stages:
            first = linears[stage[0]]
            stats = InputStatistics(first.in_features, self.method.statistics, device=device)
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
                self._prune_linears([by_name[name] for name in stage], dict.fromkeys(stage, stats), report, device)
            broadcast_layer(layer)
        return dense

    def _call_order(self, layer, linears: dict[str, nn.Linear], hidden, kw, device) -> list[list[str]]:
        """The target Linears grouped by the tensor they read, groups in the order the layer calls them."""
        collector = StatisticsCollector(linears, dict.fromkeys(linears, frozenset()), stop_when_done=True)
        try:
            self._run_layer(layer, [hidden], [kw], device, [collector], keep=False)
        finally:
            collector.remove()
        check_called(linears, collector)
        return collector.groups

    def _note_changes(self, changes: dict[str, torch.Tensor]) -> None:
        """Record what the current layer changed, for the checkpoint's commit (if there is one)."""
        if self._changes is not None:
            self._changes.update(changes)

    def _prune_linears(self, tasks: list[LinearTask], stats: dict, report: PruneReport, device: torch.device) -> None:
        # Linears that read the same tensor (same statistics object) and share a target are solved together
        batches: dict[tuple[int, Target], list[LinearTask]] = {}
        for task in tasks:
            batches.setdefault((id(stats.get(task.name, task.name)), task.target), []).append(task)
        for (_, target), members in batches.items():
            weights = [read_weight(task.linear, device) for task in members]
            for task, weight in zip(members, weights):
                check_finite_weight(task.name, weight)
            results = self.method.prune_linears(weights, stats.get(members[0].name), target)
            for task, result in zip(members, results):
                check_finite_result(self.method.name, task.name, result.weight)
                self._note_changes({task.name: write_weight(task.linear, result.weight, result.mask)})
                report.record(task.name, int(result.mask.sum()), result.mask.numel())

    def _expert_collector(self, tasks, device) -> ExpertCollector | None:
        """Per-expert statistics of the banks the layer's expert tasks need: the banks pruned
        unstructured; for narrower experts the down projections' inputs (and the up projections'
        when the method scores producers)."""
        banks = [task.bank for task in tasks.experts]
        kinds = self.method.statistics
        for task in tasks.channels:
            if task.remove > 0:
                banks += [task.channels.up] if self.method.producer_statistics else []
                banks.append(task.channels.down)
                kinds = kinds | self.method.producer_statistics
        if not banks:
            return None
        return ExpertCollector(banks, kinds, device, all_tokens=self.config.expert_calibration == "all")

    def _prune_experts(self, tasks: list[ExpertTask], collector: ExpertCollector | None, report: PruneReport,
                       device: torch.device) -> None:
        """Prune each expert of each bank as its own 2-D problem (`solve_expert_bank`), with the
        statistics of its tokens (none for a method without calibration)."""
        if not tasks:
            return
        if collector is not None:
            collector.check()
            reduce_statistics([s for task in tasks for s in collector.stats[task.name]])
        for task in tasks:
            stats = None if collector is None else collector.stats[task.name]
            solved = solve_expert_bank(self.method, task.bank, task.target, stats, self.config.min_expert_tokens, device)
            self._note_changes({task.name: solved.stored})
            report.record(task.name, solved.pruned, solved.total)
            report.expert_matrices += task.bank.num_experts
            if solved.fallbacks:
                report.expert_fallbacks[task.name] = solved.fallbacks

    def _narrow_experts(self, tasks: list[ExpertChannelTask], collector: ExpertCollector | None, report: PruneReport,
                        device: torch.device) -> None:
        """Remove the same number of intermediate channels from every expert of each experts
        module, each expert's channels chosen (and its down projection restored) by the method as
        the channel group of its own 2-D problem (`solve_expert_channels`)."""
        if not tasks:
            return
        if collector is not None:
            collector.check()
            reduce_statistics([s for stats in collector.stats.values() for s in stats])
        for task in tasks:
            channels = task.channels
            before = channels.params
            if task.remove == 0:
                report.record(task.name, 0, before)
                continue
            stats = collector.stats if collector is not None else {}
            solved = solve_expert_channels(self.method, channels, task.remove, stats.get(channels.up.name),
                                           stats.get(channels.down.name), self.config.min_expert_tokens, device)
            narrow_experts(channels, solved.up, solved.down, solved.up_bias, set_param)
            report.record(task.name, before - channels.params, before)
            report.expert_matrices += channels.num_experts
            if solved.fallbacks:
                report.expert_fallbacks[task.name] = solved.fallbacks
            self._note_changes({f"{task.name}.{name}": value for name, value in solved.tensors(channels).items()})

    def _drop_experts(self, layer, tasks: list[ExpertDropTask], inputs, kwargs, device, report: PruneReport):
        """Remove whole experts of the layer's MoE blocks, chosen by the method from what the
        calibration tokens routed to them (`ExpertUsageCollector`); returns the next layer's inputs."""
        usage, outputs = None, None
        if self.method.needs_calibration:
            usage = ExpertUsageCollector([task.block for task in tasks])
            try:
                outputs = self._run_layer(layer, inputs, kwargs, device, [usage], keep=not self.config.sequential)
            finally:
                usage.remove()
            reduce_sums([*usage.tokens.values(), *usage.weighted_norm.values()])
        for task in tasks:
            block = task.block
            before, count = block.params, block.num_experts
            if task.remove == 0:
                report.record(task.name, 0, before)
                continue
            found = usage.usage(block) if usage is not None else ExpertUsage(
                torch.zeros(count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64), block.groups)
            keep = self.method.select_experts(found, task.remove).to(torch.long).sort().values
            if keep.numel() != count - task.remove or keep.unique().numel() != keep.numel():
                raise RuntimeError(f"{self.method.name} kept {keep.numel()} distinct experts of {task.name}, "
                                   f"expected {count - task.remove}")
            remove_experts(block, keep, set_param, read=current_value)
            report.record(task.name, before - block.params, before)
            report.removed_experts[task.name] = sorted(set(range(count)) - set(keep.tolist()))
            self._note_changes({f"{task.name}.keep_experts": keep})
        broadcast_layer(layer)
        if inputs is not None and (outputs is None or self.config.sequential):
            outputs = self._run_layer(layer, inputs, kwargs, device, None, keep=True)
        return outputs

    def _prune_structured(self, index: int, stats: dict, report: PruneReport, device: torch.device) -> None:
        report.total_params += self._fixed_params[index]  # Linears of the layer that cannot shrink
        for task in self.plan[index].groups:
            name, group, remove = task.name, task.group, task.remove
            if remove == 0:
                report.sparsity[name] = 0.0
                report.total_params += group.params
                continue
            problem, weights = read_group_problem(
                group, device, stats.get(group.producers[0].name), stats.get(group.consumer_name)
            )
            if self.kept_units is not None and name in self.kept_units:  # units fixed: only restore
                keep = self.kept_units[name].to(device=problem.consumer.device, dtype=torch.long).sort().values
                result = StructuredResult(keep, self.method.restore(problem, keep))
            else:
                result = self.method.prune_structured(problem, remove)
            if result.keep.numel() != group.units - remove:
                raise RuntimeError(f"{self.method.name} kept {result.keep.numel()} units of {name}, "
                                   f"expected {group.units - remove}")
            report.total_params += group.params
            apply_to_group(group, result.keep, weights, result.consumer_weight, report, self.method.name)
            self._note_changes({f"{name}.keep": result.keep})
            if result.consumer_weight is not None:
                self._note_changes({f"{name}.consumer": result.consumer_weight})

