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
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration import PruningConfig
from ..patterns import SparsityPattern, Target, resolve_sparsity
from ..errors import PruningError
from ..methods.base import PruningMethod
from ..methods.structured import StructuredProblem, StructuredResult
from ..structure.budget import plan_removals
from ..structure.groups import ChannelGroup, group_selected, layer_groups
from ..structure.layers import summarize_names, weight_inventory, find_decoder_layers, first_match, linear_params, select_target_linears
from ..structure.shrink import describe_widths, replace_param, shrink_group
from .activations import ActivationStore, check_place
from .checkpoint import SAFETENSORS_DTYPES, LayerCheckpoint, fingerprint
from .distributed import broadcast_layer, reduce_statistics
from .statistics import InputStatistics


logger = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What a prune did: measured sparsity per Linear and overall, and how long it took."""

    sparsity: dict[str, float] = field(default_factory=dict)
    pruned_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    layer_weights: int = 0  # weights in the decoder layers' matrices (routers left out); 0: not measured
    covered_weights: int = 0  # of those, the ones in tensors the prune targeted
    unhandled: dict[str, int] = field(default_factory=dict)  # matrices no pruning path handles: name -> weights

    @property
    def overall_sparsity(self) -> float:
        """Zeros made among the weights the prune targeted (see `coverage` for how many those are)."""
        return self.pruned_params / max(self.total_params, 1)

    @property
    def coverage(self) -> float | None:
        """Share of the decoder layers' matrix weights in tensors the prune targeted (None: not measured)."""
        return self.covered_weights / self.layer_weights if self.layer_weights else None

    def unhandled_note(self, prefix: str) -> str | None:
        """One line naming the matrices that stayed dense because nothing can prune them, or None."""
        if not self.unhandled or not self.layer_weights:
            return None
        count = sum(self.unhandled.values())
        names = summarize_names(self.unhandled, prefix)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return (f"{count:,} weights ({count / self.layer_weights:.1%} of the decoder layers' weights) sit in tensors "
                f"optimum-prune cannot prune yet and stay dense: {shown}; the sparsity counts only the targeted "
                f"weights (leave them out with ignore=[...] / --ignore to silence this).")

    def to_dict(self) -> dict:
        return {"sparsity": dict(self.sparsity), "pruned_params": self.pruned_params, "total_params": self.total_params,
                "layer_weights": self.layer_weights, "covered_weights": self.covered_weights,
                "unhandled": dict(self.unhandled)}

    def load_dict(self, data: dict) -> None:
        self.sparsity = dict(data["sparsity"])
        self.pruned_params, self.total_params = int(data["pruned_params"]), int(data["total_params"])
        self.layer_weights = int(data.get("layer_weights", self.layer_weights))
        self.covered_weights = int(data.get("covered_weights", self.covered_weights))
        self.unhandled = dict(data.get("unhandled", self.unhandled))


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


def offload_store(module: nn.Module):
    """(CPU dict, key prefix, loader) of an accelerate-offloaded module's weights, or None. The
    loader (accelerate's ``OffloadedWeightsLoader``) reads the dict first, then its disk index."""
    hook = _offload_hook(module)
    if hook is None:
        return None
    weights_map = hook.weights_map
    loader = getattr(weights_map, "dataset", weights_map)
    return getattr(loader, "state_dict", loader), getattr(weights_map, "prefix", ""), loader


def _store_put(linear: nn.Linear, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the offloaded parameter ``name`` of ``linear``. A parameter that the store
    keeps on disk is written back to disk (accelerate's ``offload_weight``: a ``.dat`` file in the
    offload folder, the index updated), so pruned weights do not pile up in CPU memory; the
    original checkpoint files are never modified."""
    state, prefix, loader = offload_store(linear)
    key = prefix + name
    folder, index = getattr(loader, "save_folder", None), getattr(loader, "index", None)
    if folder is not None and index is not None and key in index and key not in state:
        from accelerate.utils import offload_weight

        offload_weight(value.detach().to("cpu").contiguous(), key, folder, index=index)
    else:
        state[key] = value.detach().to("cpu")


_DTYPE_OF_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def stored_dtype(linear: nn.Linear, name: str) -> torch.dtype:
    """Dtype of an offloaded parameter, from the store's index or file header when it can be had
    without reading the tensor (a disk-offloaded weight is read once, to be pruned, not twice)."""
    state, prefix, loader = offload_store(linear)
    key = prefix + name
    info = None if key in state else getattr(loader, "index", {}).get(key)
    if info is not None and isinstance(getattr(torch, str(info.get("dtype")), None), torch.dtype):
        return getattr(torch, info["dtype"])
    if info is not None and info.get("safetensors_file") and "dtype" not in info:
        from safetensors import safe_open

        with safe_open(info["safetensors_file"], framework="pt") as handle:
            dtype = _DTYPE_OF_SAFETENSORS.get(handle.get_slice(info.get("weight_name", key)).get_dtype())
        if dtype is not None:
            return dtype
    return _offload_hook(linear).weights_map[name].dtype


def _read_weight(linear: nn.Linear, device: torch.device, name: str = "weight") -> torch.Tensor:
    hook = _offload_hook(linear)
    weight = hook.weights_map[name] if hook is not None else getattr(linear, name).detach()
    return weight.to(device=device, dtype=torch.float32)


def _write_weight(linear: nn.Linear, new: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``new`` (zeroed where ``mask``) into ``linear`` in its dtype; returns what was written."""
    offloaded = offload_store(linear)
    dtype = linear.weight.dtype if offloaded is None else stored_dtype(linear, "weight")
    value = new.to(dtype=dtype)
    if mask is not None:
        value = value.masked_fill(mask, 0)
    if offloaded is not None:  # the offload store is what the next forward loads
        _store_put(linear, "weight", value)
    if linear.weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.data.copy_(value.to(linear.weight.device))
    return value


def _set_param(linear: nn.Linear, name: str, value: torch.Tensor) -> None:
    """`replace_param` that also updates an accelerate offload store (structured shrinking)."""
    offloaded = offload_store(linear)
    if offloaded is None:
        replace_param(linear, name, value)
        return
    old = getattr(linear, name)
    dtype = stored_dtype(linear, name)
    _store_put(linear, name, value.to(dtype=dtype))
    setattr(linear, name, nn.Parameter(torch.empty(value.shape, dtype=old.dtype, device=old.device), requires_grad=False))


# ---------------------------------------------------------------------------------------------
class _StatisticsCollector:
    """Forward hooks on a layer's target Linears; Linears fed the same tensor share one accumulator."""

    def __init__(self, linears: dict[str, nn.Linear], kinds: dict[str, frozenset], stop_when_done: bool = False):
        self.kinds = kinds  # statistics to collect, per Linear name
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
                    self.stats.append(InputStatistics(x.shape[-1], self.kinds[name], device=x.device))
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


def _check_called(linears: dict, collector: _StatisticsCollector) -> None:
    missing = set(linears) - set(collector.group_of)
    if missing:
        raise PruningError(
            f"{', '.join(sorted(missing))} received no input during calibration (unused by the layer's "
            f"forward); add them to ignore."
        )


def _input_of(linear: nn.Linear, layer: nn.Module, hidden, kw, device) -> torch.Tensor:
    """The input ``linear`` receives when ``layer`` runs on one batch (the forward stops there)."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _StopForward

    handle = linear.register_forward_pre_hook(hook)
    try:
        layer(_to_device(hidden, device), **_to_device(kw, device))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise PruningError(f"{linear.__class__.__name__} received no input during calibration; add it to ignore.")
    return captured[0]


def _dense_snapshot(linear: nn.Linear) -> torch.Tensor:
    """The weight tensor a forward of ``linear`` uses now, kept aside before it is pruned. For an
    offloaded Linear the pruned weight replaces the store's tensor, so a reference suffices."""
    hook = _offload_hook(linear)
    return hook.weights_map["weight"] if hook is not None else linear.weight.data.clone()


_ON_DISK = object()  # `_exchange_weight`: the store had the weight on disk, not in its CPU dict


def _exchange_weight(linear: nn.Linear, value):
    """Make ``value`` the weight tensor the next forward of ``linear`` uses (module or offload
    store: a pointer swap, no copy); returns what it replaces, to be exchanged back. In an offload
    store the swapped-in tensor goes to the CPU dict, which the store reads first."""
    offloaded = offload_store(linear)
    if offloaded is not None:
        store, prefix, _ = offloaded
        key = prefix + "weight"
        old = store.get(key, _ON_DISK)
        if value is _ON_DISK:
            store.pop(key, None)
        else:
            store[key] = value
    else:
        old, linear.weight.data = linear.weight.data, value
    return old


@contextlib.contextmanager
def _swapped(weights: dict[nn.Linear, torch.Tensor]):
    """Run the block with the given weight tensors in the Linears."""
    saved = [(linear, _exchange_weight(linear, value)) for linear, value in weights.items()]
    try:
        yield
    finally:
        for linear, value in saved:
            _exchange_weight(linear, value)


_LIBC = None


def _release_freed_memory() -> None:
    """Give memory freed during a layer back to the OS (glibc ``malloc_trim``). The per-forward
    weight copies of offloaded layers and the solvers' temporaries are freed chunks of a few MB
    that glibc otherwise keeps in its heap, so the process's memory grows with every layer
    (measured: +20 MB per SmolLM2 layer with disk offload, flat with the trim). No-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import sys

            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _LIBC.malloc_trim  # noqa: B018 - musl and others lack it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


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
        self.removals = dict(removals or {}) if kept_units is not None else removals
        self.activations = check_place(activations)  # where the hidden states wait between layers
        self.activation_folder = activation_folder
        self.config = config
        self.method = method
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.prefix, self.layers = find_decoder_layers(model)
        self.pattern = config.parsed_pattern
        self.structured = self.pattern.kind == "structured"
        self._fixed_params = [0] * len(self.layers)
        self._changes: dict[str, torch.Tensor] = {}  # what the current layer changed, for checkpoints
        self.plan = self._build_plan()
        self.coverage = self._measure_coverage()
        note = self.coverage.unhandled_note(self.prefix)
        if note:
            logger.warning(note)

    # ------------------------------------------------------------------ planning
    def _target_for(self, name: str) -> Target:
        override = first_match(name, self.config.overrides) or {}
        pattern = SparsityPattern.parse(override.get("pattern", self.config.pattern))
        sparsity = override.get("sparsity", self.config.sparsity if "pattern" not in override else None)
        return Target(resolve_sparsity(sparsity, pattern, f"overrides for {name}: "), pattern)

    def _build_plan(self) -> list[dict]:
        plan = []
        for index, layer in enumerate(self.layers):
            layer_name = f"{self.prefix}.{index}"
            if self.structured:
                plan.append(self._structured_entry(layer, layer_name, index))
                continue
            linears = select_target_linears(layer, layer_name, self.config.targets, self.config.ignore)
            entry = {}
            for name, linear in linears.items():
                target = self._target_for(name)
                target.check_width(linear.in_features, name)
                entry[name] = (linear, target)
            plan.append(entry)
        if not any(self.prunes_anything(entry) for entry in plan):
            raise PruningError(
                f"No {'channel group' if self.structured else 'Linear'} inside the decoder layers ({self.prefix}.N) "
                f"matches targets={self.config.targets} ignore={self.config.ignore} with a non-zero sparsity; "
                f"widen targets, shorten ignore or raise the sparsity."
            )
        return plan

    def _measure_coverage(self) -> PruneReport:
        """A report holding only what the plan covers of the decoder layers' weights."""
        coverage = PruneReport()
        for index, layer in enumerate(self.layers):
            total, unhandled = weight_inventory(layer, f"{self.prefix}.{index}", self.config.targets, self.config.ignore)
            coverage.layer_weights += total
            coverage.unhandled.update(unhandled)
            linears = {}
            for item, _ in self.plan[index].values():
                for linear in ([p.linear for p in item.producers] + [item.consumer]
                               if isinstance(item, ChannelGroup) else [item]):
                    linears[id(linear)] = linear.weight.numel()
            coverage.covered_weights += sum(linears.values())
        return coverage

    def _structured_entry(self, layer, layer_name: str, index: int) -> dict[str, tuple[ChannelGroup, int]]:
        """Channel groups of one layer with the number of units each removes (possibly 0)."""
        groups = layer_groups(self.model, layer, layer_name, index)
        cfg = self.config
        excluded, fixed = set(), {}
        for group in groups:
            if not group_selected(group, cfg.targets, cfg.ignore):
                excluded.add(group.name)
            elif (override := first_match(group.name, cfg.overrides)) is not None:
                fixed[group.name] = resolve_sparsity(override.get("sparsity"), self.pattern, f"overrides[{group.name}]: ")
        layer_override = first_match(layer_name, cfg.overrides) or {}
        sparsity = resolve_sparsity(layer_override.get("sparsity", cfg.sparsity), self.pattern, f"{layer_name}: ")
        layer_params = linear_params(layer)
        self._fixed_params[index] = layer_params - sum(g.params for g in groups)  # Linears that cannot shrink
        if self.removals is not None:  # widths decided by the caller
            return {g.name: (g, self._given_removal(g)) for g in groups}
        removals = plan_removals(groups, sparsity, fixed, excluded, layer_params, cfg.channel_multiple)
        return {g.name: (g, removals[g.name]) for g in groups}

    def _given_removal(self, group: ChannelGroup) -> int:
        if self.kept_units is not None and group.name in self.kept_units:
            keep = self.kept_units[group.name]
            if keep.numel() < 1 or keep.numel() > group.units or int(keep.max()) >= group.units:
                raise PruningError(f"kept_units[{group.name!r}] must index 1..{group.units} of its {group.units} units.")
            return group.units - keep.numel()
        remove = self.removals.get(group.name, 0)
        if not 0 <= remove < group.units:
            raise PruningError(f"removals[{group.name!r}] must be in [0, {group.units}), got {remove}.")
        return remove

    @staticmethod
    def prunes_anything(entry) -> bool:
        """Whether a layer's plan prunes anything (structured groups may remove 0 units)."""
        return any(not isinstance(item, ChannelGroup) or remove > 0 for item, remove in entry.values())

    def hooked_linears(self, entry) -> dict[str, tuple[nn.Linear, frozenset]]:
        """The Linears whose inputs the statistics pass must see, with the statistics to collect.
        Producers of channel groups are hooked only if the method uses their input statistics."""
        hooked = {}
        for name, (item, remove) in entry.items():
            if isinstance(item, ChannelGroup):
                if remove == 0:
                    continue
                if self.method.producer_statistics:
                    hooked.update({p.name: (p.linear, self.method.producer_statistics) for p in item.producers})
                hooked[item.consumer_name] = (item.consumer, self.method.statistics)
            else:
                hooked[name] = (item, self.method.statistics)
        return hooked

    def compute_device(self, layer: nn.Module) -> torch.device:
        """Where ``layer`` is calibrated and solved: ``device`` if given, else where it executes."""
        return self.device or _execution_device(layer, torch.device("cpu"))

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def run(self, calibration: torch.Tensor | None, checkpoint: LayerCheckpoint | None = None) -> PruneReport:
        """Prune every layer; with ``checkpoint``, commit each finished layer to it (and continue
        from it when it holds an earlier, interrupted run of the same prune)."""
        start = time.perf_counter()
        report = PruneReport(layer_weights=self.coverage.layer_weights, covered_weights=self.coverage.covered_weights,
                             unhandled=dict(self.coverage.unhandled))
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
                self._changes = {}
                outputs = self._prune_layer(index, inputs, kwargs, report)
                if inputs is not None:
                    inputs.close()
                inputs = outputs
                _release_freed_memory()
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
        entry = self.plan[index]
        needs_data = self.method.needs_calibration
        device = self.compute_device(layer)
        with _onloaded(layer, device):
            if needs_data and not self.prunes_anything(entry):  # nothing to prune here: one pass for the next layer's inputs
                if self.structured:  # count the layer's parameters in the report
                    self._prune_structured(index, {}, report, device)
                return self._run_layer(layer, inputs, kwargs, device, None, keep=True)
            if needs_data and self.method.error_correction and not self.structured:
                dense = self._prune_linears_staged(layer, entry, inputs, kwargs, device, report)
                # the next layer sees the pruned layer (sequential) or the dense one
                with contextlib.nullcontext() if self.config.sequential else _swapped(dense):
                    return self._run_layer(layer, inputs, kwargs, device, None, keep=True)
            stats, outputs = {}, None
            if needs_data:
                keep = not self.config.sequential  # one-pass mode feeds the next layer from this pass
                hooked = self.hooked_linears(entry)
                linears = {name: linear for name, (linear, _) in hooked.items()}
                kinds = {name: stat_kinds for name, (_, stat_kinds) in hooked.items()}
                collector = _StatisticsCollector(linears, kinds, stop_when_done=not keep)
                try:
                    outputs = self._run_layer(layer, inputs, kwargs, device, collector, keep=keep)
                finally:
                    collector.remove()
                _check_called(linears, collector)
                reduce_statistics(collector.stats)  # several processes: statistics of all their windows
                stats = {name: collector.stats[i] for name, i in collector.group_of.items()}
                for i, names in enumerate(collector.groups):
                    collector.stats[i].check_finite(names[0])
            if self.structured:
                self._prune_structured(index, stats, report, device)
            else:
                self._prune_linears(entry, stats, report, device)
            broadcast_layer(layer)  # several processes: rank 0's weights everywhere
            if needs_data and self.config.sequential:
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
            with _onloaded(layer, device):
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
        for name, (item, _) in self.plan[index].items():
            if isinstance(item, ChannelGroup):
                if f"{name}.keep" in changes:
                    _, weights = read_group_problem(item, device, None, None)
                    shrink_group(item, changes[f"{name}.keep"], weights, changes.get(f"{name}.consumer"),
                                 set_param=_set_param)
            elif name in changes:
                _write_weight(item, changes[name])

    def _capture_first_layer_inputs(self, calibration: torch.Tensor):
        inputs, kwargs = ActivationStore(self.activations, self.activation_folder), []

        def capture(module, args, kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            inputs.append(hidden)
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            first_device = input_device(self.model)
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
        """Run ``layer`` on every batch; with ``keep``, its outputs (an `ActivationStore` like ``inputs``)."""
        outputs = inputs.like() if keep else None
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

    def _prune_linears_staged(self, layer, entry, inputs, kwargs, device, report: PruneReport) -> dict:
        """Intra-layer error correction: prune the layer's Linears stage by stage in the order the
        layer calls them (a stage = the Linears reading one tensor: q/k/v, then o, then gate/up,
        then down). A stage's statistics pair, batch by batch, its input in the dense layer with its
        input once the earlier stages are pruned (`InputStatistics.update_pair`), so that each
        Linear compensates the error of those before it. Returns the dense weights of the layer's
        pruned Linears (for `_swapped`)."""
        linears = {name: linear for name, (linear, _) in entry.items()}
        stages = self._call_order(layer, linears, inputs[0], kwargs[0], device)
        dense: dict[nn.Linear, torch.Tensor] = {}
        for stage in stages:
            first = linears[stage[0]]
            stats = InputStatistics(first.in_features, self.method.statistics, device=device)
            for hidden, kw in zip(inputs, kwargs):
                if not dense:  # nothing upstream is pruned yet: dense and pruned inputs coincide
                    stats.update(_input_of(first, layer, hidden, kw, device))
                    continue
                with _swapped(dense):
                    x = _input_of(first, layer, hidden, kw, device)
                stats.update_pair(x, _input_of(first, layer, hidden, kw, device))
            reduce_statistics([stats])
            stats.check_finite(stage[0])
            for name in stage:
                dense[linears[name]] = _dense_snapshot(linears[name])
            self._prune_linears({name: entry[name] for name in stage}, dict.fromkeys(stage, stats), report, device)
            broadcast_layer(layer)
        return dense

    def _call_order(self, layer, linears: dict[str, nn.Linear], hidden, kw, device) -> list[list[str]]:
        """The target Linears grouped by the tensor they read, groups in the order the layer calls them."""
        collector = _StatisticsCollector(linears, dict.fromkeys(linears, frozenset()), stop_when_done=True)
        try:
            self._run_layer(layer, [hidden], [kw], device, collector, keep=False)
        finally:
            collector.remove()
        _check_called(linears, collector)
        return collector.groups

    def _prune_linears(self, entry, stats: dict, report: PruneReport, device: torch.device) -> None:
        # Linears that read the same tensor (same statistics object) and share a target are solved together
        batches: dict[tuple[int, Target], list[str]] = {}
        for name, (_, target) in entry.items():
            batches.setdefault((id(stats.get(name, name)), target), []).append(name)
        for (_, target), members in batches.items():
            linears = [entry[name][0] for name in members]
            weights = [_read_weight(lin, device) for lin in linears]
            for name, weight in zip(members, weights):
                check_finite_weight(name, weight)
            results = self.method.prune_linears(weights, stats.get(members[0]), target)
            for name, linear, result in zip(members, linears, results):
                _check_finite_result(self.method.name, name, result.weight)
                self._changes[name] = _write_weight(linear, result.weight, result.mask)
                pruned = int(result.mask.sum())
                report.sparsity[name] = pruned / result.mask.numel()
                report.pruned_params += pruned
                report.total_params += result.mask.numel()

    def _prune_structured(self, index: int, stats: dict, report: PruneReport, device: torch.device) -> None:
        report.total_params += self._fixed_params[index]  # Linears of the layer that cannot shrink
        for name, (group, remove) in self.plan[index].items():
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
            self._changes[f"{name}.keep"] = result.keep
            if result.consumer_weight is not None:
                self._changes[f"{name}.consumer"] = result.consumer_weight


def read_group_problem(group: ChannelGroup, device, producer_stats, consumer_stats):
    """The `StructuredProblem` of a channel group (float32 weights on ``device``), and the weights
    by name (producers' biases as ``<name>.bias``) for `shrink_group`."""
    weights = {p.name: _read_weight(p.linear, device) for p in group.producers}
    weights[group.consumer_name] = _read_weight(group.consumer, device)
    for p in group.producers:
        if p.linear.bias is not None:
            weights[p.name + ".bias"] = _read_weight(p.linear, device, "bias")
    for name, weight in weights.items():
        check_finite_weight(name, weight)
    problem = StructuredProblem(
        kind=group.kind,
        units=group.units,
        producers=[weights[p.name] for p in group.producers],
        rows_per_unit=[p.rows_per_unit for p in group.producers],
        consumer=weights[group.consumer_name],
        cols_per_unit=group.cols_per_unit,
        producer_stats=producer_stats,
        consumer_stats=consumer_stats,
    )
    return problem, weights


def apply_to_group(group: ChannelGroup, keep, weights, consumer_weight, report: PruneReport, method: str) -> None:
    """Shrink ``group`` to the units ``keep`` (a method's result) and record it in ``report``."""
    if consumer_weight is not None:
        _check_finite_result(method, group.consumer_name, consumer_weight)
    before = group.params
    shrink_group(group, keep, weights, consumer_weight, set_param=_set_param)
    report.sparsity[group.name] = 1.0 - group.params / before
    report.pruned_params += before - group.params


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """Refuse a model weight that holds NaN or inf before it is pruned (no method can fix it)."""
    if not bool(torch.isfinite(weight).all()):
        raise PruningError(f"The model's weight {name} holds NaN or inf before pruning: the model file is damaged or "
                           f"was saved in a dtype that overflowed; re-download or re-save the model, or leave "
                           f"{name} out with ignore=[...] (--ignore).")


def _check_finite_result(method: str, name: str, weight: torch.Tensor) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise PruningError(f"{method} produced non-finite weights for {name} from finite ones: its linear systems are "
                           f"too ill-conditioned; raise dampening (--dampening), e.g. to 0.1.")


def input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    return torch.device("cpu")
