"""The layer-wise engine: the walk over the decoder layers. What each layer gets is planned in
`plan.py` (one task per piece of work, `tasks/`), the passes over one layer live in `passes.py`,
hooks in `calibration/capture.py`, devices and offload stores in `runtime/offload.py`.

1. Run the calibration windows through the model until the first decoder layer and capture its
   inputs (hidden states and the keyword arguments the layer needs).
2. For each decoder layer: bring it onto the compute device and run the captured inputs through it
   once, feeding every task of the layer what it declared (the inputs of hooked Linears, each
   kind's own collector: per-expert statistics, expert usage); let each kind solve its tasks and
   write the new weights back; run the layer again so that the next layer sees the outputs of the
   *pruned* layer (``sequential=True``), or keep the dense outputs of the statistics pass
   (``sequential=False``, one pass per layer). With intra-layer error correction the Linears are
   first pruned stage by stage (`passes.prune_linears_staged`).
3. With a checkpoint, commit each finished layer (the changes each task noted, the next inputs);
   a resume replays the commits through each task's ``replay``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.capture import StatisticsCollector, check_called
from ..calibration.profiles import layer_sparsities
from ..configuration import PruningConfig
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..runtime.distributed import broadcast_layer, min_over_ranks, reduce_statistics, solves_shared, synchronize
from ..runtime.host_memory import release_host_memory
from ..runtime.offload import execution_device, onloaded, swapped
from ..structure.layers import find_decoder_layers
from ..structure.shrink import describe_widths
from .activations import ActivationStore, check_place
from .base import Engine
from .checkpoint import LayerCheckpoint, fingerprint
from .passes import capture_layer_inputs, prune_linears_staged, run_layer
from .plan import LayerPlan, LayerTasks
from .report import PruneReport
from .resources import check_memory as check_layer_memory
from .tasks import LayerRun, LinearTask


logger = logging.getLogger(__name__)


class LayerwiseEngine(Engine):
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
        self.expert_chunk: int | None = None  # experts per statistics pass of a MoE layer (None: all; `resources`)
        self._solve_times: dict = {}  # several processes: what each layer's pieces took (`solves.solve_problems`)
        self._use_plan(LayerPlan(model, self.prefix, self.layers, config, method, removals, kept_units))
        if method.error_correction and not config.sequential and any(t.expert_banks() for t in self.plan):
            raise PruningError(f"{method.name} with error correction prunes fused MoE experts only in sequential mode; "
                               f"drop sequential=False (--one-pass) or set error_correction=false.")

    def _use_plan(self, planned: LayerPlan) -> None:
        self.planned = planned
        self.plan, self.coverage, self.fixed_params = planned.entries, planned.coverage, planned.fixed_params
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

    supports_processes = True

    def prepare(self, windows: torch.Tensor | None) -> None:
        """A sparsity profile other than uniform: each layer's sparsity, measured on the dense model."""
        if self.config.sparsity_profile != "uniform":
            self.use_layer_sparsity(layer_sparsities(self.model, self.planned, self.config, windows))

    def check_memory(self, num_windows: int, seqlen: int, input_device: torch.device, checkpoint: bool) -> None:
        check_layer_memory(self, num_windows, seqlen, input_device, checkpoint=checkpoint)

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
                             unhandled=dict(self.coverage.unhandled), routers=dict(self.coverage.routers),
                             ignored=dict(self.coverage.ignored), layer_sparsity=self.layer_sparsity,
                             layer_patterns=self.layer_patterns)
        inputs = kwargs = None
        if self.method.needs_calibration:
            if calibration is None or calibration.numel() == 0:
                raise PruningError(f"Method {self.method.name!r} needs calibration data; none was given.")
            inputs, kwargs = capture_layer_inputs(self.model, self.layers, calibration, self.config.batch_size,
                                                  ActivationStore(self.activations, self.activation_folder))
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
                outputs = self._prune_layer(index, inputs, None if kwargs is None else kwargs[index], report)
                if inputs is not None:
                    inputs.close()
                inputs = outputs
                release_host_memory()
                if checkpoint is not None:
                    synchronize()  # several processes commit a layer together (at most one apart after a kill)
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
        """Prune decoder layer ``index``; returns the inputs of the next layer (None without data).

        Every kind of work present in the layer is solved in ``TASK_KINDS`` order after one
        statistics pass that feeds all of them (the hooked Linears' inputs, each kind's own
        collector); with error correction the Linears are first pruned stage by stage
        (`passes.prune_linears_staged`) and the pass feeds the remaining kinds."""
        layer, tasks = self.layers[index], self.plan[index]
        needs_data, sequential = self.method.needs_calibration, self.config.sequential
        device = self.compute_device(layer)
        if self.structured:
            report.total_params += self.fixed_params[index]  # Linears of the layer that cannot shrink
        run = LayerRun(self.method, self.config, device, report, self._note_changes, self.kept_units,
                       self._solve_times)
        kinds = tasks.by_kind()
        with onloaded(layer, device):
            if needs_data and not tasks.prunes_anything():  # one pass for the next layer's inputs
                for kind, members in kinds.items():
                    kind.solve(members, run, {}, None)  # counted in the report at 0
                return run_layer(layer, inputs, kwargs, device, keep=True)
            dense = {}
            if needs_data and self.method.error_correction and LinearTask in kinds:
                dense = prune_linears_staged(layer, kinds.pop(LinearTask), inputs, kwargs, run)
            stats, collectors, outputs = {}, {}, None
            chunks = self.expert_chunks(kinds)
            run.expert_chunk = chunks[0]
            if needs_data and kinds:  # one-pass mode feeds the next layer from this (dense) pass
                stats, collectors, outputs = self._statistics_pass(layer, LayerTasks(
                    [t for members in kinds.values() for t in members]), inputs, kwargs, run,
                    keep=not sequential and not dense)
            chunked = self._solve_expert_chunks(layer, kinds, chunks, inputs, kwargs, run, collectors)
            with report.timed("solve"):
                for kind, members in kinds.items():
                    if kind not in chunked:
                        kind.solve(members, run, stats, collectors.get(kind))
            if not solves_shared():
                broadcast_layer(layer)  # several processes solving everything: rank 0's weights everywhere
            if needs_data and (sequential or outputs is None):  # the pruned layer, or the dense one (one pass)
                with contextlib.nullcontext() if sequential else swapped(dense), report.timed("forward"):
                    outputs = run_layer(layer, inputs, kwargs, device, keep=True)
        return outputs

    def expert_chunks(self, kinds) -> list[range | None]:
        """The experts of each statistics pass of a MoE layer (``kinds``: its tasks by kind): [None]
        (all, or no statistics), or the memory plan's chunks."""
        experts = max((b.num_experts for kind, members in kinds.items()
                       for b in kind.statistics_banks(members, self.method)), default=0)
        if not self.method.needs_calibration or self.expert_chunk is None or self.expert_chunk >= experts:
            return [None]
        return [range(i, min(i + self.expert_chunk, experts)) for i in range(0, experts, self.expert_chunk)]

    def _solve_expert_chunks(self, layer, kinds, chunks, inputs, kwargs, run: LayerRun, collectors) -> set:
        """Several statistics passes per MoE layer: the kinds with per-expert statistics solve the
        experts of one chunk, then the next chunk's statistics are collected (another pass over the
        layer: the other experts' inputs do not depend on the solved ones). Returns those kinds."""
        if len(chunks) == 1:
            return set()
        chunked = {kind: members for kind, members in kinds.items() if kind.statistics_banks(members, self.method)}
        for number, chunk in enumerate(chunks):
            if number:  # the chunk before is solved and its statistics freed: this chunk's pass
                run.expert_chunk = chunk
                _, found, _ = self._statistics_pass(layer, LayerTasks(
                    [t for members in chunked.values() for t in members]), inputs, kwargs, run, keep=False)
            else:
                found = {kind: collectors.pop(kind) for kind in chunked if kind in collectors}
            with run.report.timed("solve"):
                for kind, members in chunked.items():
                    kind.solve(members, run, {}, found.get(kind))
            del found
        return set(chunked)

    def _statistics_pass(self, layer, tasks: LayerTasks, inputs, kwargs, run: LayerRun, keep: bool):
        """Run the layer once with the statistics every task needs: (hooked Linear name ->
        `InputStatistics`, kind -> its own collector, the layer's outputs when ``keep``)."""
        hooked = self.hooked_linears(tasks)
        linears = {name: linear for name, (linear, _) in hooked.items()}
        collectors = {kind: found for kind, members in tasks.by_kind().items()
                      if (found := kind.collector(members, run)) is not None}
        # a pass that feeds a collector of its own runs to the end (experts come after the Linears)
        collector = StatisticsCollector(linears, {name: kinds for name, (_, kinds) in hooked.items()},
                                        stop_when_done=not keep and not collectors) if linears else None
        active = [c for c in (collector, *collectors.values()) if c is not None]
        try:
            with run.report.timed("statistics"):
                outputs = run_layer(layer, inputs, kwargs, run.device, active, keep=keep)
        finally:
            for found in active:
                found.remove()
        if collector is None:
            return {}, collectors, outputs
        check_called(linears, collector)
        reduce_statistics(collector.stats)  # several processes: statistics of all their windows
        stats = {name: collector.stats[i] for name, i in collector.group_of.items()}
        for i, names in enumerate(collector.groups):
            collector.stats[i].check_finite(names[0])
        return stats, collectors, outputs

    def _resume(self, checkpoint: LayerCheckpoint, calibration, inputs, report: PruneReport):
        """Validate ``checkpoint`` and replay what it holds: (first layer to prune, its inputs, seconds spent)."""
        state = checkpoint.begin(fingerprint(self.model, self.config, calibration), len(self.layers))
        agreed = min_over_ranks(state["next_layer"] if state is not None else 0)  # several processes: all done
        if state is not None:
            state = checkpoint.rewind(agreed)
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
        for tasks in self.plan[index].by_kind().values():
            for task in tasks:
                task.replay(changes, device)

    def _note_changes(self, changes: dict[str, torch.Tensor]) -> None:
        """Record what the current layer changed, for the checkpoint's commit (if there is one)."""
        if self._changes is not None:
            self._changes.update(changes)
