"""The depth units of a model — whole decoder layers, or their attention / MLP blocks — for the engines
that remove them (`depth.py`: ranked by a measure; `global_search.py`: gated beside the channels):
their names, parameters and eligibility (`DepthUnits`), their influence on the residual stream
measured in one pass (`measure_influence`), the loss increase of removing each alone
(`measure_loss_increase`), and the hooks that compute a unit's removal in a forward
pass (`pass_through`, `zeroed`, `gated`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.capture import first_output, run_windows
from ..errors import PruningError
from ..modeling import BLOCK_MODULES
from ..runtime.distributed import reduce_sums
from ..runtime.offload import input_device
from ..structure.layers import linear_params, matches

#: the kinds of unit, as ``granularity`` names them
UNIT_KINDS = {"layer": ("layer",), "attention": ("attention",), "mlp": ("mlp",), "block": ("attention", "mlp")}
#: families whose attention block adds the output of a norm after the attention to the residual stream
_ATTENTION_OUTPUT = {"gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm"}


class DepthUnits:
    """The units of ``granularity`` (a key of `UNIT_KINDS`) of decoder ``layers`` (named ``prefix.N``),
    in the order layer 0's attention, layer 0's MLP, layer 1's ...; ``candidates``: the units that
    ``targets`` / ``ignore`` allow and that are still there (a block left out before has no
    parameters)."""

    def __init__(self, prefix: str, layers: nn.ModuleList, family: str, granularity: str, targets, ignore):
        self.prefix, self.layers, self.family = prefix, layers, family
        self.kinds = UNIT_KINDS[granularity]
        if self.kinds != ("layer",) and family not in BLOCK_MODULES:
            raise PruningError(f"{family} decoder layers cannot lose their attention or MLP block alone "
                               f"(supported: {', '.join(sorted(BLOCK_MODULES))}); use granularity=layer.")
        self.targets, self.ignore = targets, ignore
        self.units = [(index, kind) for index in range(len(layers)) for kind in self.kinds]
        self.params = torch.tensor([sum(p.numel() for module in self.modules(*unit) for p in module.parameters())
                                    for unit in self.units], dtype=torch.float64)
        self.candidates = torch.tensor([self._allowed(*unit) for unit in self.units]) & (self.params > 0)

    def name(self, index: int, kind: str) -> str:
        """``model.layers.3`` for a layer, ``model.layers.3.self_attn`` / ``.mlp`` for a block."""
        name = f"{self.prefix}.{index}"
        return name if kind == "layer" else f"{name}.{BLOCK_MODULES[self.family][kind][0]}"

    def modules(self, index: int, kind: str) -> list[nn.Module]:
        """The modules that go with the unit (a block's norms included)."""
        layer = self.layers[index]
        return [layer] if kind == "layer" else [getattr(layer, n) for n in BLOCK_MODULES[self.family][kind]]

    def linear_params(self, index: int, kind: str) -> int:
        """Weights and biases of the Linears inside the unit."""
        return sum(linear_params(module) for module in self.modules(index, kind))

    def output_module(self, index: int, kind: str) -> nn.Module:
        """The module whose output is the unit's contribution to the residual stream (the layer itself
        for a layer: see `pass_through`)."""
        layer = self.layers[index]
        return layer if kind == "layer" else getattr(layer, BLOCK_MODULES[self.family][kind][0])

    def _allowed(self, index: int, kind: str) -> bool:
        layer, name = f"{self.prefix}.{index}", self.name(index, kind)
        targeted = not self.targets or matches(layer, self.targets) or matches(name, self.targets)
        return targeted and not matches(layer, self.ignore) and not matches(name, self.ignore)


@torch.no_grad()
def measure_influence(model: nn.Module, layers: nn.ModuleList, family: str, windows: torch.Tensor, batch_size: int,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """``1 - mean cos`` over the tokens of ``windows`` of every decoder layer (``"layer"``: its input
    against its output) and, for the families whose blocks can go, of every attention block (``h``
    against ``h + a``) and MLP block (``h + a`` against the layer's output); float64, summed over
    processes."""
    kinds = ("layer", "attention", "mlp") if family in BLOCK_MODULES else ("layer",)
    sums = torch.zeros(len(kinds), len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)
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
    for index, layer in enumerate(layers):
        enter, attention, leave = hooks(index)
        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave, with_kwargs=True))
        if len(kinds) > 1:
            output = _ATTENTION_OUTPUT.get(family, BLOCK_MODULES[family]["attention"][0])
            handles.append(layer.get_submodule(output).register_forward_hook(attention))
    try:
        run_windows(model, windows, batch_size, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    reduce_sums([sums, count])  # several processes: the cosines of all their windows
    return {kind: 1.0 - sums[row] / count.clamp(min=1) for row, kind in enumerate(kinds)}


@torch.no_grad()
def measure_loss_increase(model: nn.Module, depth: DepthUnits, units: list[tuple[int, str]], windows: torch.Tensor,
                          batch_size: int) -> torch.Tensor:
    """Per unit of ``units``: the mean next-token loss over ``windows`` with that unit alone removed (a
    layer passing its input through, a block's output zeroed: what removal computes) minus the loss of
    the model as it is; float64, summed over processes (one pass per unit, and one of the model)."""
    device = input_device(model)

    def loss() -> float:
        total = 0.0
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                             reduction="sum"))
        return total

    sums = torch.zeros(len(units) + 1, dtype=torch.float64)
    sums[0] = loss()
    for i, (index, kind) in enumerate(units):
        handle = depth.output_module(index, kind).register_forward_hook(
            pass_through if kind == "layer" else zeroed, with_kwargs=True)
        try:
            sums[i + 1] = loss()
        finally:
            handle.remove()
    count = torch.tensor([float(windows[:, 1:].numel())], dtype=torch.float64)
    reduce_sums([sums, count])
    return (sums[1:] - sums[0]) / count


def pass_through(module, args, kwargs, output):
    """A decoder layer that returns its input: what a removed layer computes."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def zeroed(module, args, kwargs, output):
    """A block whose output is zeros: what a removed block computes."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def gated(gate, layer: bool):
    """A forward hook (``with_kwargs``) scaling a unit's contribution to the residual stream by
    ``gate(rows)`` (one value per batch row, 1: kept, 0: removed): a block's output times the gate, a
    layer's output ``h + gate * (out - h)``."""
    def hook(module, args, kwargs, output):
        out = first_output(output)
        scale = gate(out.shape[0]).to(device=out.device, dtype=out.dtype).view(-1, *[1] * (out.dim() - 1))
        if layer:
            hidden = args[0] if args else kwargs["hidden_states"]
            new = hidden + scale * (out - hidden)
        else:
            new = out * scale
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])
    return hook
