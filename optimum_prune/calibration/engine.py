"""The sequential layer engine: the only code that knows about hooks, devices and offload.

1. Run the calibration windows through the model until the first decoder layer and capture its
   inputs (hidden states and the keyword arguments the layer needs).
2. For each decoder layer: bring it onto the compute device, hook its target Linears and run the
   captured inputs through it to accumulate the statistics the method declared; hand each group
   of Linears that read the same tensor to the method; write the new weights back; run the layer
   again so that the next layer sees the outputs of the *pruned* layer (``sequential=True``), or
   keep the dense outputs of the statistics pass (``sequential=False``, one pass per layer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration import PruningConfig, SparsityPattern, resolve_sparsity
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..methods.masks import Target
from ..structure.layers import find_decoder_layers, first_match, select_target_linears
from .statistics import InputStatistics


logger = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What a prune did: measured sparsity per Linear and overall, and how long it took."""

    sparsity: dict[str, float] = field(default_factory=dict)
    pruned_params: int = 0
    total_params: int = 0
    seconds: float = 0.0

    @property
    def overall_sparsity(self) -> float:
        return self.pruned_params / max(self.total_params, 1)


class _StopForward(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# device helpers (accelerate-dispatched models keep offloaded weights in their hook's weights_map)
# ---------------------------------------------------------------------------------------------
def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _offload_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and getattr(hook, "offload", False) else None


def _execution_device(layer: nn.Module, fallback: torch.device) -> torch.device:
    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    for param in layer.parameters():
        if param.device.type != "meta":
            return param.device
    return fallback


@contextlib.contextmanager
def _onloaded(layer: nn.Module, device: torch.device):
    """Weights of ``layer`` on ``device`` for the duration of the block.

    Modules offloaded by accelerate (CPU or disk) are left to their hooks, which load the weights
    from the offload store for every forward; everything else is moved and moved back.
    """
    moved = [
        module
        for module in layer.modules()
        if _offload_hook(module) is None
        and any(p.device != device and p.device.type != "meta" for p in module.parameters(recurse=False))
    ]
    homes = [next(module.parameters(recurse=False)).device for module in moved]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(moved, homes):
            module.to(home)


def _offload_store(module: nn.Module):
    """(mapping, key prefix) of an accelerate-offloaded module's weights, or None."""
    hook = _offload_hook(module)
    if hook is None:
        return None
    weights_map = hook.weights_map
    store = getattr(weights_map, "dataset", weights_map)
    return getattr(store, "state_dict", store), getattr(weights_map, "prefix", "")


def _read_weight(linear: nn.Linear, device: torch.device) -> torch.Tensor:
    hook = _offload_hook(linear)
    weight = hook.weights_map["weight"] if hook is not None else linear.weight.detach()
    return weight.to(device=device, dtype=torch.float32)


def _write_weight(linear: nn.Linear, new: torch.Tensor, mask: torch.Tensor) -> None:
    offloaded = _offload_store(linear)
    dtype = linear.weight.dtype if offloaded is None else _offload_hook(linear).weights_map["weight"].dtype
    value = new.to(dtype=dtype).masked_fill(mask, 0)
    if offloaded is not None:  # the offload store is what the next forward loads
        store, prefix = offloaded
        store[prefix + "weight"] = value.to("cpu")
    if linear.weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.data.copy_(value.to(linear.weight.device))


# ---------------------------------------------------------------------------------------------
class _StatisticsCollector:
    """Forward hooks on a layer's target Linears; Linears fed the same tensor share one accumulator."""

    def __init__(self, linears: dict[str, nn.Linear], kinds, stop_when_done: bool = False):
        self.kinds = kinds
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.stats: list[InputStatistics] = []
        self._seen: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._updated: set[int] = set()
        self._called: set[str] = set()
        self._total = len(linears)
        self._stop_when_done = stop_when_done
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if name in self.group_of:
                index = self.group_of[name]
            else:  # first batch: group by the identity of the input tensor
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                if key in self._seen:
                    index = self._seen[key][0]
                else:
                    index = len(self.groups)
                    self.groups.append([])
                    self.stats.append(InputStatistics(x.shape[-1], self.kinds, device=x.device))
                    self._seen[key] = (index, x)  # holding x keeps its memory from being reused
                self.group_of[name] = index
                self.groups[index].append(name)
            if index not in self._updated:
                self._updated.add(index)
                self.stats[index].update(x)
            self._called.add(name)
            if self._stop_when_done and len(self._called) == self._total:
                # every target has its input: the rest of the layer (this Linear included) is not needed
                raise _StopForward

        return hook

    def next_batch(self):
        self._seen.clear()
        self._updated.clear()
        self._called.clear()

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerwiseEngine:
    """Runs one prune of ``model`` with ``method`` as described by ``config``."""

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        method: PruningMethod,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.config = config
        self.method = method
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.prefix, self.layers = find_decoder_layers(model)
        self.plan = self._build_plan()

    # ------------------------------------------------------------------ planning
    def _target_for(self, name: str) -> Target:
        override = first_match(name, self.config.overrides) or {}
        pattern = SparsityPattern.parse(override.get("pattern", self.config.pattern))
        sparsity = override.get("sparsity", self.config.sparsity if "pattern" not in override else None)
        return Target(resolve_sparsity(sparsity, pattern, f"overrides for {name}: "), pattern)

    def _build_plan(self) -> list[dict[str, tuple[nn.Linear, Target]]]:
        plan = []
        for index, layer in enumerate(self.layers):
            linears = select_target_linears(layer, f"{self.prefix}.{index}", self.config.targets, self.config.ignore)
            entry = {}
            for name, linear in linears.items():
                target = self._target_for(name)
                target.check_width(linear.in_features, name)
                entry[name] = (linear, target)
            plan.append(entry)
        if not any(plan):
            raise PruningError(
                f"No Linear inside the decoder layers ({self.prefix}.N) matches targets={self.config.targets} "
                f"ignore={self.config.ignore}; widen targets or shorten ignore."
            )
        return plan

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def run(self, calibration: torch.Tensor | None) -> PruneReport:
        start = time.perf_counter()
        report = PruneReport()
        needs_data = self.method.needs_calibration
        if needs_data:
            if calibration is None or calibration.numel() == 0:
                raise PruningError(f"Method {self.method.name!r} needs calibration data; none was given.")
            inputs, kwargs = self._capture_first_layer_inputs(calibration)
        bar = tqdm(range(len(self.layers)), desc=f"{self.method.name}", unit="layer", disable=not self.progress)
        for index in bar:
            layer = self.layers[index]
            entry = self.plan[index]
            device = self.device or _execution_device(layer, torch.device("cpu"))
            with _onloaded(layer, device):
                if needs_data and not entry:  # nothing to prune here: one pass for the next layer's inputs
                    inputs = self._run_layer(layer, inputs, kwargs, device, None, keep=True)
                    continue
                if needs_data:
                    keep = not self.config.sequential  # one-pass mode feeds the next layer from this pass
                    linears = {n: lin for n, (lin, _) in entry.items()}
                    collector = _StatisticsCollector(linears, self.method.statistics, stop_when_done=not keep)
                    try:
                        outputs = self._run_layer(layer, inputs, kwargs, device, collector, keep=keep)
                    finally:
                        collector.remove()
                    groups = [(names, collector.stats[i]) for i, names in enumerate(collector.groups)]
                    missing = set(entry) - set(collector.group_of)
                    if missing:
                        raise PruningError(
                            f"{', '.join(sorted(missing))} received no input during calibration (unused by the layer's "
                            f"forward); add them to ignore."
                        )
                else:
                    groups = [([name], None) for name in entry]
                self._prune_groups(entry, groups, report, device)
                if needs_data and self.config.sequential:
                    outputs = self._run_layer(layer, inputs, kwargs, device, None, keep=True)
            if needs_data:
                inputs = outputs
            bar.set_postfix(sparsity=f"{report.overall_sparsity:.3f}")
        report.seconds = time.perf_counter() - start
        return report

    def _capture_first_layer_inputs(self, calibration: torch.Tensor):
        inputs, kwargs = [], []

        def capture(module, args, kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            inputs.append(hidden)
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            first_device = _input_device(self.model)
            for batch in calibration.split(self.config.batch_size):
                try:
                    self.model(input_ids=batch.to(first_device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            self.model.train(was_training)
        return inputs, kwargs

    def _run_layer(self, layer, inputs, kwargs, device, collector, keep):
        outputs = []
        for hidden, kw in zip(inputs, kwargs):
            try:
                out = layer(_to_device(hidden, device), **_to_device(kw, device))
            except _StopForward:
                out = None  # statistics-only pass cut short after the last target Linear
            if collector is not None:
                collector.next_batch()
            if keep:
                outputs.append(_first_output(out).to(hidden.device))
        return outputs

    def _prune_groups(self, entry, groups, report: PruneReport, device: torch.device) -> None:
        for names, stats in groups:
            if stats is not None:
                stats.check_finite(names[0])
            by_target: dict[Target, list[str]] = {}
            for name in names:
                by_target.setdefault(entry[name][1], []).append(name)
            for target, members in by_target.items():
                linears = [entry[name][0] for name in members]
                weights = [_read_weight(lin, device) for lin in linears]
                results = self.method.prune_linears(weights, stats, target)
                for name, linear, result in zip(members, linears, results):
                    if not bool(torch.isfinite(result.weight).all()):
                        raise FloatingPointError(
                            f"{self.method.name} produced non-finite weights for {name}; raise `dampening`."
                        )
                    _write_weight(linear, result.weight, result.mask)
                    pruned = int(result.mask.sum())
                    report.sparsity[name] = pruned / result.mask.numel()
                    report.pruned_params += pruned
                    report.total_params += result.mask.numel()


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    return torch.device("cpu")
