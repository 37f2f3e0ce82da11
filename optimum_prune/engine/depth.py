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

from ..calibration.capture import first_output, run_windows
from ..configuration import PruningConfig
from ..errors import PruningError
from ..modeling import BLOCK_MODULES
from ..runtime.distributed import reduce_sums
from ..runtime.offload import input_device
from ..structure.groups import base_model_type
from ..structure.layers import find_decoder_layers, matches
from ..structure.shrink import remove_blocks, remove_layers
from .base import Engine, in_eval_mode, require_windows
from .report import PruneReport

#: the kinds of unit, as ``granularity`` names them
UNIT_KINDS = {"layer": ("layer",), "attention": ("attention",), "mlp": ("mlp",), "block": ("attention", "mlp")}
#: families whose attention block adds the output of a norm after the attention to the residual stream
_ATTENTION_OUTPUT = {"gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm"}


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
        self.kinds = UNIT_KINDS[getattr(method.options, "granularity", "layer")]
        if self.kinds != ("layer",) and self.family not in BLOCK_MODULES:
            raise PruningError(f"{self.family} decoder layers cannot lose their attention or MLP block alone "
                               f"(supported: {', '.join(sorted(BLOCK_MODULES))}); use granularity=layer.")
        self.units = [(index, kind) for index in range(len(self.layers)) for kind in self.kinds]
        self.params = torch.tensor([self._unit_params(index, kind) for index, kind in self.units], dtype=torch.float64)
        # a block already absent (a model pruned before) has nothing left to remove
        self.candidates = torch.tensor([self._allowed(index, kind) for index, kind in self.units]) & (self.params > 0)
        if not bool(self.candidates.any()):
            raise PruningError(f"No decoder layer or block ({self.prefix}.N) matches targets={config.targets} "
                               f"ignore={config.ignore}; nothing could be removed.")
        self.layer_params = sum(sum(p.numel() for p in layer.parameters()) for layer in self.layers)

    def unit_name(self, index: int, kind: str) -> str:
        """``model.layers.3`` for a layer, ``model.layers.3.self_attn`` / ``.mlp`` for a block."""
        name = f"{self.prefix}.{index}"
        return name if kind == "layer" else f"{name}.{BLOCK_MODULES[self.family][kind][0]}"

    def _allowed(self, index: int, kind: str) -> bool:
        layer, name = f"{self.prefix}.{index}", self.unit_name(index, kind)
        targeted = not self.config.targets or matches(layer, self.config.targets) or matches(name, self.config.targets)
        return targeted and not matches(layer, self.config.ignore) and not matches(name, self.config.ignore)

    def _unit_params(self, index: int, kind: str) -> int:
        layer = self.layers[index]
        modules = [layer] if kind == "layer" else [getattr(layer, n) for n in BLOCK_MODULES[self.family][kind]]
        return sum(p.numel() for module in modules for p in module.parameters())

    @torch.no_grad()
    def influence(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``1 - mean cos`` over the tokens of ``windows`` of every layer (``"layer"``) and, for the
        families whose blocks can go, of every attention and MLP block."""
        kinds = ("layer", "attention", "mlp") if self.family in BLOCK_MODULES else ("layer",)
        sums = torch.zeros(len(kinds), len(self.layers), dtype=torch.float64)
        count = torch.zeros(len(self.layers), dtype=torch.float64)
        seen: dict[str, torch.Tensor] = {}

        def cos(a, b):
            return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum())

        def hooks(index):
            def enter(module, args, kwargs):
                seen["in"] = args[0] if args else kwargs["hidden_states"]

            def attention(module, args, output):
                seen["mid"] = seen["in"] + first_output(output)

            def leave(module, args, kwargs, output):
                out = first_output(output)
                sums[0, index] += cos(seen["in"], out)
                if len(kinds) > 1:
                    sums[1, index] += cos(seen["in"], seen["mid"])
                    sums[2, index] += cos(seen["mid"], out)
                count[index] += out.shape[:-1].numel()
                seen.clear()
            return enter, attention, leave

        handles = []
        for index, layer in enumerate(self.layers):
            enter, attention, leave = hooks(index)
            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(layer.register_forward_hook(leave, with_kwargs=True))
            if len(kinds) > 1:
                output = _ATTENTION_OUTPUT.get(self.family, BLOCK_MODULES[self.family]["attention"][0])
                handles.append(layer.get_submodule(output).register_forward_hook(attention))
        try:
            run_windows(self.model, windows, self.config.batch_size, progress=self.progress)
        finally:
            for handle in handles:
                handle.remove()
        reduce_sums([sums, count])  # several processes: the cosines of all their windows
        return {kind: 1.0 - sums[row] / count.clamp(min=1) for row, kind in enumerate(kinds)}

    @torch.no_grad()
    def loss_increase(self, windows: torch.Tensor) -> torch.Tensor:
        """Per unit: the mean next-token loss on the first ``score_samples`` windows with the unit
        removed (a layer passing its input through, a block's output zeroed: what removal computes)
        minus the loss of the model as it is. Units that are not candidates score 0 (never chosen)."""
        windows = windows[: self.method.options.score_samples]
        device = input_device(self.model)

        def loss() -> float:
            total = 0.0
            for batch in windows.split(self.config.batch_size):
                batch = batch.to(device)
                logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                                 reduction="sum"))
            return total

        sums = torch.zeros(len(self.units) + 1, dtype=torch.float64)
        sums[0] = loss()
        for i, (index, kind) in enumerate(self.units):
            if not self.candidates[i]:
                sums[i + 1] = sums[0]
                continue
            layer = self.layers[index]
            module = layer if kind == "layer" else getattr(layer, BLOCK_MODULES[self.family][kind][0])
            handle = module.register_forward_hook(_pass_through if kind == "layer" else _zeroed, with_kwargs=True)
            try:
                sums[i + 1] = loss()
            finally:
                handle.remove()
        count = torch.tensor([float(windows[:, 1:].numel())], dtype=torch.float64)
        reduce_sums([sums, count])
        return (sums[1:] - sums[0]) / count

    def run(self, windows: torch.Tensor | None, checkpoint=None) -> PruneReport:
        require_windows(windows, self.method)
        start = time.perf_counter()
        with in_eval_mode(self.model):
            influence = self.influence(windows)
            per_unit = torch.stack([influence[kind][index] for index, kind in self.units])
            if getattr(self.method.options, "score", "influence") == "loss":
                per_unit = self.loss_increase(windows)
        layer_of = torch.tensor([index for index, _ in self.units])
        drop = self.method.select(per_unit, self.params, self.config.sparsity * self.layer_params, self.candidates,
                                  layer_of)
        chosen = [self.units[int(i)] for i in drop]
        report = self._report(influence, chosen)
        report.unit_scores = {self.unit_name(*unit): float(v) for unit, v in zip(self.units, per_unit)}
        if self.kinds == ("layer",):
            remove_layers(self.model, report.removed_layers)
        else:
            remove_blocks(self.model, chosen)
        report.seconds = time.perf_counter() - start
        return report

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


def _pass_through(module, args, kwargs, output):
    """A decoder layer that returns its input: what a removed layer computes."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def _zeroed(module, args, kwargs, output):
    """A block whose output is zeros: what a removed block computes."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)
