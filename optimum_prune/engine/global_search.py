"""The engine of global structured methods (policy gradient): whole-model forward passes with masks.

A global method does not walk the layers. It needs, for every channel group of the model:
statistics of the dense model (for its initial scores and the consumers' restoration), and a way
to evaluate the language-model loss of the model with some units masked. This engine provides both
with hooks — a forward pre-hook on each group's consumer multiplies its input by the unit mask,
which is exactly what removing those units computes — and then shrinks the model to the final
mask with the same code as the layer-wise structured methods.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import PruningConfig
from ..errors import PruningError
from ..methods.structured import Gate, GlobalProblem
from ..modeling import BLOCK_MODULES
from ..registry import get_method
from ..structure.groups import ChannelGroup, base_model_type, group_selected, layer_groups
from ..structure.layers import find_decoder_layers, linear_params
from ..structure.shrink import describe_widths, remove_blocks, remove_layers
from .problems import apply_to_group, read_group_problem
from ..calibration.capture import StatisticsCollector, check_called, run_windows
from ..runtime.offload import input_device
from .base import Engine, in_eval_mode, require_windows
from .checkpoint import nested, open_whole, unnested
from .blocks import DepthUnits, gated, measure_influence, measure_loss_increase
from .report import PruneReport
from .resources import MemoryEstimate, forward_bytes, free_on, refuse_beyond


logger = logging.getLogger(__name__)


class GlobalStructuredEngine(Engine):
    """Policy-gradient-style methods: every channel group of the model in one problem."""

    def __init__(self, model: nn.Module, config: PruningConfig, method, device=None, progress: bool = True,
                 activations: str = "device", activation_folder=None):
        if config.overrides:
            raise PruningError(
                f"Method {method.name!r} allocates widths globally; per-module overrides do not apply. "
                f"Use targets/ignore to exclude modules."
            )
        self.model, self.config, self.method, self.progress = model, config, method, progress
        self.device = torch.device(device) if device is not None else None
        self.activations, self.activation_folder = activations, activation_folder  # for the layer-wise finish
        self.prefix, self.layers = find_decoder_layers(model)
        self.groups: list[ChannelGroup] = []
        for index, layer in enumerate(self.layers):
            self.groups += [
                group
                for group in layer_groups(model, layer, f"{self.prefix}.{index}", index)
                if group_selected(group, config.targets, config.ignore)
            ]
        if not self.groups:
            raise PruningError(f"No channel group matches targets={config.targets} ignore={config.ignore}.")
        self.layer_params = sum(linear_params(layer) for layer in self.layers)  # every decoder-layer Linear
        self.family = base_model_type(model.config)
        blocks = getattr(method.options, "blocks", "none")
        # depth units gated beside the channels: (layer index, kind) and the channel groups inside each
        self.gate_units, self.gate_groups, self.gate_params, self.whole_params = [], [], [], {}
        if blocks != "none":
            self.depth = DepthUnits(self.prefix, self.layers, self.family, blocks, config.targets, config.ignore)
            for unit, candidate in zip(self.depth.units, self.depth.candidates.tolist()):
                index, kind = unit
                inside = [i for i, g in enumerate(self.groups) if g.layer_index == index and kind in ("layer", g.kind)]
                if candidate:
                    self.whole_params[unit] = self.depth.linear_params(index, kind)
                    self.gate_units.append(unit)
                    self.gate_groups.append(inside)
                    own = self.depth.linear_params(index, kind) - sum(self.groups[i].params for i in inside)
                    self.gate_params.append(max(own, 0))
            if not self.gate_units:
                raise PruningError(f"blocks={blocks!r}: no decoder layer or block ({self.prefix}.N) matches "
                                   f"targets={config.targets} ignore={config.ignore}.")

    def check_memory(self, num_windows: int, seqlen: int, input_device: torch.device, checkpoint: bool) -> None:
        """Refuse, before the search, a prune whose whole-model passes will not fit where the model runs:
        the dense statistics of every group held through the search (Grams for a one-pass restoration)
        beside the largest forward pass (a statistics batch, the samples of a step, or a chunk of
        sensitivity probes); then the layer-wise finish's own check (its engine's, per layer)."""
        opts = self.method.options
        probes = 8 if opts.init_scope == "sensitivity" else 1  # 7 probes and the unmasked model per call
        rows = max(min(self.config.batch_size, num_windows), opts.samples * opts.windows_per_step,
                   probes * opts.windows_per_step)
        gram = "gram" in self.method.statistics
        statistics = sum(4 * g.producers[0].linear.in_features + 4 * g.consumer.in_features
                         + (4 * g.consumer.in_features ** 2 if gram else 0) for g in self.groups)
        estimate = MemoryEstimate()
        estimate.add(input_device, "statistics", statistics)
        estimate.add(input_device, "forward", forward_bytes(self.model, self.layers, rows, seqlen))
        refuse_beyond(estimate, free_on(input_device),
                      "a smaller batch_size, fewer samples or windows_per_step, or a shorter seqlen")
        if opts.layerwise_finish:  # the finish's memory per layer does not depend on the widths: one unit off each group
            finish = self._finishing_engine(removals={g.name: 1 for g in self.groups if g.units > 1})
            finish.check_memory(num_windows, seqlen, input_device, checkpoint)

    # ------------------------------------------------------------------ statistics of the dense model
    def _collect_statistics(self, windows: torch.Tensor):
        """Input statistics of every group's first producer and of its consumer, over all windows."""
        linears, kinds = {}, {}
        for group in self.groups:
            linears[group.producers[0].name] = group.producers[0].linear
            kinds[group.producers[0].name] = self.method.producer_statistics
            linears[group.consumer_name], kinds[group.consumer_name] = group.consumer, self.method.statistics
        collector = StatisticsCollector(linears, kinds, share_inputs=False)
        try:
            run_windows(self.model, windows, self.config.batch_size, progress=self.progress)
        finally:
            collector.remove()
        check_called(linears, collector)
        stats = {name: collector.stats[i] for name, i in collector.group_of.items()}
        producer_stats = [stats[group.producers[0].name] for group in self.groups]
        consumer_stats = [stats[group.consumer_name] for group in self.groups]
        for group, p, c in zip(self.groups, producer_stats, consumer_stats):
            p.check_finite(group.producers[0].name)
            c.check_finite(group.consumer_name)
        return producer_stats, consumer_stats

    # ------------------------------------------------------------------ masked forward passes
    def _evaluator(self, windows: torch.Tensor):
        per_step = self.method.options.windows_per_step
        state = {"masks": None, "cursor": 0}

        def make_hook(index, cols_per_unit):
            def pre_hook(module, args):
                mask = state["masks"][index].to(device=args[0].device, dtype=args[0].dtype)  # (K, units)
                repeat = args[0].shape[0] // mask.shape[0]
                cols = mask.repeat_interleave(cols_per_unit, dim=1).repeat_interleave(repeat, dim=0)
                return (args[0] * cols[:, None, :], *args[1:])
            return pre_hook

        device = input_device(self.model)

        def evaluate(masks: list[torch.Tensor], batch_index: int | None = None) -> torch.Tensor:
            samples = masks[0].shape[0]
            if batch_index is None:  # the next batch in turn
                start = state["cursor"] % windows.shape[0]
                state["cursor"] += per_step
            else:  # a given batch (the same windows for several calls)
                start = (batch_index * per_step) % windows.shape[0]
            batch = windows[start:start + per_step]
            state["masks"] = masks
            ids = batch.repeat(samples, 1).to(device)  # rows of sample k: k * len(batch) ...
            logits = self.model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device),
                                  reduction="none").view(ids.shape[0], -1).mean(1)
            return nll.view(samples, -1).mean(1).cpu()

        handles = [g.consumer.register_forward_pre_hook(make_hook(i, g.cols_per_unit)) for i, g in enumerate(self.groups)]
        for b, (index, kind) in enumerate(self.gate_units):
            def gate(rows, b=b):
                values = state["masks"][-1][:, b]  # (K,): one per sample, its rows in turn
                return values.repeat_interleave(rows // values.shape[0])
            module = self.depth.output_module(index, kind)
            handles.append(module.register_forward_hook(gated(gate, layer=kind == "layer"), with_kwargs=True))
        return evaluate, handles, state

    # ------------------------------------------------------------------ the prune
    @torch.no_grad()
    def run(self, windows: torch.Tensor | None, checkpoint=None) -> PruneReport:
        """Search, then shrink; with ``checkpoint``, the search's decision is committed before the model
        changes (a resume takes it instead of searching again) and the layer-wise finish commits each
        layer to the checkpoint's ``finish`` stage."""
        require_windows(windows, self.method)
        saved, spent = open_whole(checkpoint, self.model, self.config, windows, len(self.layers))
        start = time.perf_counter() - spent  # with the time an interrupted run spent
        stats = None
        if saved is None:
            keeps, stats = self._search(windows, checkpoint, start)
            if checkpoint is not None:
                checkpoint.commit_decision(self._decision(keeps), {"history": self.history},
                                           time.perf_counter() - start)
        else:
            keeps = self._restore(*saved)
        removed = [unit for unit, kept in zip(self.gate_units, getattr(self.method, "kept_gates", [])) if not kept]
        if self.method.options.layerwise_finish:
            renamed = self._remove_units(removed)  # first: the finish calibrates on the shallower model
            if any(0 < int(keep.sum()) < keep.numel() for keep in keeps):
                stage = checkpoint.stage("finish") if checkpoint is not None else None
                report = self._finish_layerwise(windows, keeps, renamed, stage)
            else:  # whole units went, no channel: nothing left to restore
                report = PruneReport()
                for group, keep in zip(self.groups, keeps):
                    if keep.any():
                        report.record(renamed[group.name], 0, group.params)
                _, layers = find_decoder_layers(self.model)
                report.layer_weights = sum(linear_params(layer) for layer in layers)
                report.covered_weights = report.total_params
            self._report_units(report, removed)
        else:
            report = self._restore_groups(windows, keeps, stats)
            self._remove_units(removed)
            self._report_units(report, removed)
            report.total_params = self.layer_params
            describe_widths(self.model)
        report.seconds = time.perf_counter() - start
        return report

    def _search(self, windows: torch.Tensor, checkpoint=None, start: float = 0.0):
        """The method's optimisation over every group (and gate) with masked forward passes: the keep
        mask per group, and the dense statistics it started from. With ``checkpoint``, the search's
        state is committed as it goes (`LayerCheckpoint.commit_search`) and continued from there."""
        with in_eval_mode(self.model):
            producer_stats, consumer_stats = self._collect_statistics(windows)
            gates = self._gates(windows) if self.gate_units else []
            evaluate, handles, cursor = self._evaluator(windows)
            resume, save = self._search_checkpoint(checkpoint, cursor, start)
            global_problem = GlobalProblem(
                kinds=[g.kind for g in self.groups],
                unit_params=[g.params_per_unit for g in self.groups],
                scores=[self.method.unit_scores(self._problem(i, producer_stats, consumer_stats)[0]).cpu()
                        for i in range(len(self.groups))],
                sparsity=self._group_sparsity(),
                evaluate=evaluate,
                progress=self.progress,
                seed=self.config.seed,
                channel_multiple=self.config.channel_multiple,
                gates=gates,
                resume=resume,
                save=save,
            )
            try:
                keeps = self.method.optimise(global_problem)
            finally:
                for handle in handles:
                    handle.remove()
        self.history = global_problem.history
        return keeps, (producer_stats, consumer_stats)

    @staticmethod
    def _search_checkpoint(checkpoint, cursor: dict, start: float):
        """(the search state an interrupted run committed, or None; the callback that commits it, or
        None without a checkpoint). ``cursor``: the evaluator's place in the calibration batches."""
        if checkpoint is None:
            return None, None
        resume = None
        found = checkpoint.search()
        if found is not None:
            tensors, notes = found
            resume = {"s": tensors["s"], "generator": tensors["generator"], **notes}
            cursor["cursor"] = resume.pop("cursor")

        def save(state: dict) -> None:
            notes = {key: state[key] for key in ("baseline", "step", "history")}
            checkpoint.commit_search({"s": state["s"], "generator": state["generator"]},
                                     {**notes, "cursor": cursor["cursor"]}, time.perf_counter() - start)

        return resume, save

    def _decision(self, keeps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a resume needs of the search: each group's keep mask, the gates kept and their
        probabilities, the influence the gates started from."""
        tensors = {f"keep.{i}": keep.to(torch.bool) for i, keep in enumerate(keeps)}
        if self.gate_units:
            tensors["kept_gates"] = torch.as_tensor(self.method.kept_gates, dtype=torch.bool)
            tensors["gate_probabilities"] = self.method.gate_probabilities
            tensors.update(nested("influence", self.influence))
        return tensors

    def _restore(self, tensors: dict[str, torch.Tensor], notes: dict) -> list[torch.Tensor]:
        """The keep masks of a committed decision, the method's and this engine's state set as the
        search left them."""
        self.history = notes.get("history", [])
        if self.gate_units:
            self.method.kept_gates = tensors["kept_gates"]
            self.method.gate_probabilities = tensors["gate_probabilities"]
            self.influence = unnested("influence", tensors)
        return [tensors[f"keep.{i}"] for i in range(len(self.groups))]

    def _restore_groups(self, windows: torch.Tensor, keeps: list[torch.Tensor], stats) -> PruneReport:
        """Every group shrunk to its keep mask, the consumer restored by the method from the dense
        statistics (collected again after a resume)."""
        if stats is None:
            with in_eval_mode(self.model):
                stats = self._collect_statistics(windows)
        report = PruneReport()
        for i, (group, keep_mask) in enumerate(zip(self.groups, keeps)):
            if not keep_mask.any():  # inside a removed layer or block
                continue
            if keep_mask.all():  # nothing removed: left as it is (as the layer-wise finish leaves it)
                report.sparsity[group.name] = 0.0
                continue
            # weights are read again here rather than held as float32 copies through the optimisation
            problem, weights = self._problem(i, *stats)
            keep = keep_mask.nonzero().squeeze(1).to(problem.consumer.device)
            apply_to_group(group, self.method.restore(problem, keep), weights, report, self.method.name)
        return report

    # ------------------------------------------------------------------ depth units
    def _gates(self, windows: torch.Tensor) -> list[Gate]:
        """The gated units, each scored by its influence on the residual stream (one dense pass) or, with
        ``block_score="loss"``, by the loss increase of removing it alone (a pass per gate); a removal that
        does not raise the loss scores as the smallest increase measured (the start maps log scores)."""
        influence = measure_influence(self.model, self.layers, self.family, windows, self.config.batch_size,
                                      self.progress)
        self.influence = influence
        scores = [float(influence[kind][index]) for index, kind in self.gate_units]
        opts = self.method.options
        if getattr(opts, "block_score", "influence") == "loss":
            increase = measure_loss_increase(self.model, self.depth, self.gate_units,
                                             windows[: opts.block_score_samples], self.config.batch_size)
            positive = increase[increase > 0]
            floor = float(positive.min()) if positive.numel() else 1e-6
            scores = increase.clamp_min(floor).tolist()
        return [Gate(groups=inside, params=own, score=score, kind=kind)
                for (_, kind), inside, own, score in zip(self.gate_units, self.gate_groups, self.gate_params, scores)]

    def _remove_units(self, removed: list[tuple[int, str]]) -> dict[str, str]:
        """Remove the gated-off layers and blocks; the new name of every channel group left (layers
        after a removed one move up)."""
        if not removed:
            return {g.name: g.name for g in self.groups}
        layer_objects = list(self.layers)
        if self.family in BLOCK_MODULES:
            remove_blocks(self.model, [(i, block) for i, kind in removed
                                       for block in (("attention", "mlp") if kind == "layer" else (kind,))])
        else:
            remove_layers(self.model, [i for i, _ in removed])
        _, layers = find_decoder_layers(self.model)
        position = {id(layer): new for new, layer in enumerate(layers)}
        renamed = {}
        for group in self.groups:
            new = position.get(id(layer_objects[group.layer_index]))
            old = f"{self.prefix}.{group.layer_index}."
            if new is not None and group.name.startswith(old):
                renamed[group.name] = f"{self.prefix}.{new}.{group.name[len(old):]}"
        return renamed

    def _report_units(self, report: PruneReport, removed: list[tuple[int, str]]) -> None:
        """The removed layers and blocks in the report: their Linear parameters count as pruned (and in
        the decoder's weights, which the finish measured on the shallower model)."""
        gone: dict[int, set[str]] = {}
        for index, kind in removed:
            gone.setdefault(index, set()).update(("attention", "mlp") if kind == "layer" else (kind,))
        report.removed_layers = sorted(i for i, kinds in gone.items() if kinds == {"attention", "mlp"})
        report.removed_blocks = [self.depth.name(i, kind) for i, kind in removed
                                 if kind != "layer" and gone[i] != {"attention", "mlp"}]
        if self.gate_units:
            report.layer_influence = [float(v) for v in self.influence["layer"]]
            report.unit_scores = {self.depth.name(*unit): float(p)
                                  for unit, p in zip(self.gate_units, self.method.gate_probabilities)}
        for index, kind in removed:
            params = self.whole_params[(index, kind)]
            report.record(self.depth.name(index, kind), params, params)
            if report.layer_weights:
                report.layer_weights += params
                report.covered_weights += params

    def _finish_layerwise(self, windows: torch.Tensor, keeps: list[torch.Tensor], renamed: dict[str, str],
                          checkpoint=None) -> PruneReport:
        """Shrink to the learned widths layer by layer, each layer calibrated on the outputs of the
        already-pruned ones, with the method's `finishing_step` (policy gradient: the kept units
        restored by FASP's least squares, or its ``local_method`` choosing the units itself)."""
        if self.method.finishing_step()[1]:
            kept = {renamed[g.name]: keep.nonzero().squeeze(1) for g, keep in zip(self.groups, keeps)
                    if g.name in renamed and keep.any()}
            engine = self._finishing_engine(kept_units=kept)
        else:
            removals = {renamed[g.name]: g.units - int(keep.sum()) for g, keep in zip(self.groups, keeps)
                        if g.name in renamed and keep.any()}
            engine = self._finishing_engine(removals=removals)
        return engine.run(windows, checkpoint=checkpoint)

    def _finishing_engine(self, **widths):
        """The layer-wise engine of the method's `finishing_step` (``widths``: its ``kept_units`` or
        ``removals``)."""
        from .layerwise import LayerwiseEngine

        name, _, options = self.method.finishing_step()
        finisher = get_method(name)
        local = finisher(finisher.parse_options(options), dampening=self.method.dampening)
        return LayerwiseEngine(self.model, self.config, local, device=self.device, progress=self.progress,
                               activations=self.activations, activation_folder=self.activation_folder, **widths)

    def _problem(self, index: int, producer_stats, consumer_stats):
        group = self.groups[index]
        return read_group_problem(group, self.device or _home_device(group), producer_stats[index], consumer_stats[index])

    def _group_sparsity(self) -> float:
        """The groups' share of the removal so that ``sparsity`` of all decoder-layer Linear
        parameters goes (Linears that cannot shrink, such as OPT's attention, count in the total). A budget
        in time (policy gradient's ``cost="latency"``) is the method's own: ``sparsity`` as it is."""
        if getattr(self.method.options, "cost", "params") == "latency":
            return self.config.sparsity
        group_params = sum(g.params for g in self.groups) + sum(self.gate_params)
        share = self.config.sparsity * self.layer_params / group_params
        if share >= 1:
            raise PruningError(
                f"sparsity {self.config.sparsity:g} of the decoder layers is more than the prunable groups hold; lower it."
            )
        return share



def _home_device(group: ChannelGroup) -> torch.device:
    device = group.consumer.weight.device
    return torch.device("cpu") if device.type == "meta" else device
