"""The depth engine: whole decoder layers, or their attention / MLP blocks, removed by a method that
ranks them (`removes_layers`).

One pass of the calibration windows through the dense model. Hooks on every decoder layer read the
residual stream where it enters the layer (``h``), after the attention block added to it
(``h + a``, from the module whose output is added: the attention, or Gemma's norm after it) and where
it leaves (``out``), and accumulate per token, in float64, the cosines ``cos(h, out)`` (the layer),
``cos(h, h + a)`` (the attention block) and ``cos(h + a, out)`` (the MLP block). The method turns one
influence per unit (``1 - mean cosine``) into the units to remove within the budget;
`structure.shrink.remove_layers` deletes whole layers (a stock config with fewer layers) and
`structure.shrink.remove_blocks` leaves blocks out (``no_op`` blocks: the heterogeneous classes, the
Nemotron-NAS form for the Llama family).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..configuration import PruningConfig
from ..errors import PruningError
from ..structure.groups import base_model_type
from ..structure.layers import find_decoder_layers
from ..structure.shrink import remove_blocks, remove_layers
from .base import Engine, in_eval_mode, require_windows
from .checkpoint import nested, open_whole, unnested
from .blocks import DepthUnits, measure_influence, measure_loss_increase
from .report import PruneReport
from .resources import MemoryEstimate, forward_bytes, free_on, refuse_beyond


class DepthEngine(Engine):
    """Removes the units (layers, or attention / MLP blocks) ``method.select`` picks from their measured
    influence."""

    supports_processes = True

    def __init__(self, model: nn.Module, config: PruningConfig, method, device=None, progress: bool = True,
                 activations: str = "device", activation_folder=None):
        if config.overrides:
            raise PruningError(f"Method {method.name!r} removes whole decoder layers or blocks; per-module overrides "
                               f"do not apply. Use ignore=[...] to keep layers (e.g. 'model.layers.0').")
        self.model, self.config, self.method, self.progress = model, config, method, progress
        self.prefix, self.layers = find_decoder_layers(model)
        self.family = base_model_type(model.config)
        self.depth = DepthUnits(self.prefix, self.layers, self.family, getattr(method.options, "granularity", "layer"),
                                config.targets, config.ignore)
        self.kinds, self.units, self.params = self.depth.kinds, self.depth.units, self.depth.params
        # a block already absent (a model pruned before) has nothing left to remove
        self.candidates = self.depth.candidates
        if not bool(self.candidates.any()):
            raise PruningError(f"No decoder layer or block ({self.prefix}.N) matches targets={config.targets} "
                               f"ignore={config.ignore}; nothing could be removed.")
        self.layer_params = sum(sum(p.numel() for p in layer.parameters()) for layer in self.layers)

    def check_memory(self, num_windows: int, seqlen: int, input_device: torch.device, checkpoint: bool) -> None:
        """Refuse, before the first pass, a prune whose whole-model forward passes (one batch of windows
        each, the influence hooks' per-unit sums beside them) will not fit where the model runs."""
        estimate = MemoryEstimate()
        estimate.add(input_device, "forward", forward_bytes(self.model, self.layers,
                                                            min(self.config.batch_size, max(num_windows, 1)), seqlen))
        refuse_beyond(estimate, free_on(input_device), "a smaller batch_size or a shorter seqlen")

    def unit_name(self, index: int, kind: str) -> str:
        """``model.layers.3`` for a layer, ``model.layers.3.self_attn`` / ``.mlp`` for a block."""
        return self.depth.name(index, kind)

    def influence(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``1 - mean cos`` of every layer and block (`blocks.measure_influence`)."""
        return measure_influence(self.model, self.layers, self.family, windows, self.config.batch_size, self.progress)

    def loss_increase(self, windows: torch.Tensor) -> torch.Tensor:
        """Per unit: the calibration loss increase when it alone is removed, on the first ``score_samples``
        windows (`blocks.measure_loss_increase`). Units that are not candidates score 0 (never chosen)."""
        chosen = self.candidates.nonzero().squeeze(1).tolist()
        measured = measure_loss_increase(self.model, self.depth, [self.units[i] for i in chosen],
                                         windows[: self.method.options.score_samples], self.config.batch_size)
        per_unit = torch.zeros(len(self.units), dtype=torch.float64)
        per_unit[chosen] = measured
        return per_unit

    def run(self, windows: torch.Tensor | None, checkpoint=None) -> PruneReport:
        """Measure, choose, remove; with ``checkpoint``, the choice is committed before the model changes
        and a resume takes it instead of measuring again."""
        require_windows(windows, self.method)
        saved, spent = open_whole(checkpoint, self.model, self.config, windows, len(self.layers))
        start = time.perf_counter() - spent  # with the time an interrupted run spent
        if saved is None:
            influence, per_unit, drop = self._choose(windows)
            if checkpoint is not None:
                checkpoint.commit_decision({"drop": drop, "per_unit": per_unit, **nested("influence", influence)}, {},
                                           time.perf_counter() - start)
        else:
            tensors, _ = saved
            drop, per_unit, influence = tensors["drop"], tensors["per_unit"], unnested("influence", tensors)
        chosen = [self.units[int(i)] for i in drop]
        report = self._report(influence, chosen)
        report.unit_scores = {self.unit_name(*unit): float(v) for unit, v in zip(self.units, per_unit)}
        if self.kinds == ("layer",):
            remove_layers(self.model, report.removed_layers)
        else:
            remove_blocks(self.model, chosen)
        report.seconds = time.perf_counter() - start
        return report

    def _choose(self, windows: torch.Tensor):
        """The influence of every unit, the score the method ranks by, and the units it removes."""
        with in_eval_mode(self.model):
            influence = self.influence(windows)
            per_unit = torch.stack([influence[kind][index] for index, kind in self.units])
            if getattr(self.method.options, "score", "influence") == "loss":
                per_unit = self.loss_increase(windows)
        layer_of = torch.tensor([index for index, _ in self.units])
        drop = self.method.select(per_unit, self.params, self.config.sparsity * self.layer_params, self.candidates,
                                  layer_of)
        return influence, per_unit, torch.as_tensor(drop, dtype=torch.long)

    def _report(self, influence: dict[str, torch.Tensor], chosen: list[tuple[int, str]]) -> PruneReport:
        by_layer: dict[int, set[str]] = {}
        for index, kind in chosen:
            by_layer.setdefault(index, set()).update(("attention", "mlp") if kind == "layer" else (kind,))
        report = PruneReport(
            layer_influence=[float(v) for v in influence["layer"]],
            block_influence={kind: [float(v) for v in influence[kind]] for kind in ("attention", "mlp")
                             if kind in influence},
            removed_layers=sorted(i for i, kinds in by_layer.items() if kinds == {"attention", "mlp"}),
            removed_blocks=[self.unit_name(i, kind) for i, kind in chosen
                            if kind != "layer" and by_layer[i] != {"attention", "mlp"}])
        removed = set(chosen)
        for unit, params in zip(self.units, self.params.tolist()):
            if params:  # a block already absent: nothing to record
                report.record(self.unit_name(*unit), int(params) if unit in removed else 0, int(params))
        # the ranked units' share of the decoder layers: sparsity x coverage = the fraction of the decoder removed
        report.layer_weights, report.covered_weights = int(self.layer_params), report.total_params
        return report

