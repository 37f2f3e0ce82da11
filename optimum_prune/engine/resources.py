"""Resource guard: estimate what one layer of a prune needs, and refuse early if it cannot fit.

Per decoder layer the engine holds, on the compute device: the calibration activations (the
layer's inputs and outputs for every window), the input statistics of the layer's Linears (an
``in x in`` float32 Gram matrix per Linear, twice with error correction), the solver's
working copies of the largest batch of Linears it solves at once (`PruningMethod.workspace_bytes`),
the transient tensors of one forward batch, and the layer's weights when they are brought in from
elsewhere (CPU or disk offload). The estimate is deliberately simple (it ignores the allocator's
fragmentation) and is compared with the memory free *now* on each device involved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PruningError, format_bytes


logger = logging.getLogger(__name__)

@dataclass
class MemoryEstimate:
    """Bytes a prune needs at its peak, by device and by what they hold."""

    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> {what: bytes}

    def add(self, device: torch.device | str, what: str, nbytes: int) -> None:
        bucket = self.parts.setdefault(str(device), {})
        bucket[what] = bucket.get(what, 0) + int(nbytes)

    def total(self, device: str) -> int:
        return sum(self.parts.get(device, {}).values())

    def describe(self, device: str) -> str:
        return ", ".join(f"{what} {format_bytes(nbytes)}" for what, nbytes in self.parts[device].items() if nbytes)


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (None: unknown, no check)."""
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    return None


def activation_bytes(engine, num_windows: int, seqlen: int, input_device: torch.device) -> dict[str, int]:
    """The layer's inputs and its outputs (the next layer's inputs) for every window, where the
    engine keeps them (device -> bytes); on disk only the batch in flight (counted in "forward")."""
    if not engine.method.needs_calibration or engine.activations == "disk":
        return {}
    model_config = getattr(engine.model, "config", None)
    first_linear = next(m for m in engine.layers[0].modules() if isinstance(m, nn.Linear))
    hidden = getattr(model_config, "hidden_size", None) or first_linear.in_features
    act_bytes = next(engine.layers[0].parameters()).element_size()
    where = input_device if engine.activations == "device" else torch.device("cpu")
    return {str(where): 2 * num_windows * seqlen * hidden * act_bytes}


def estimate_memory(engine, num_windows: int, seqlen: int, input_device: torch.device,
                    home: torch.device | None = None, checkpoint: bool = False) -> MemoryEstimate:
    """Peak memory of ``engine`` (a `LayerwiseEngine`) pruning with ``num_windows`` x ``seqlen`` tokens,
    beyond the model's weights. ``home``: where weights now on the meta device will live (a plan-only run);
    ``checkpoint``: the prune commits every layer to a checkpoint (the layer's new weights are held
    until the commit)."""
    estimate = MemoryEstimate()
    for device, nbytes in activation_bytes(engine, num_windows, seqlen, input_device).items():
        estimate.add(device, "activations", nbytes)
    worst: dict[str, dict[str, int]] = {}
    for index in range(len(engine.layers)):
        found = layer_parts(engine, index, num_windows, seqlen, home, checkpoint)
        if found is None:
            continue
        device, parts, (experts, per_expert) = found
        if experts:  # the experts of one statistics pass
            chunk = experts if engine.expert_chunk is None else min(engine.expert_chunk, experts)
            parts["statistics"] += chunk * per_expert
        if sum(parts.values()) > sum(worst.get(str(device), {}).values()):
            worst[str(device)] = parts
    for device, parts in worst.items():
        for what, nbytes in parts.items():
            estimate.add(device, what, nbytes)
    return estimate


def layer_parts(engine, index: int, num_windows: int, seqlen: int, home: torch.device | None = None,
                checkpoint: bool = False):
    """What pruning decoder layer ``index`` holds at its peak on its compute device: (device, parts
    without the fused MoE banks' per-expert statistics, (experts, bytes of one expert's statistics
    over all the layer's banks)); None for a layer the prune leaves alone."""
    method, config = engine.method, engine.config
    model_config = getattr(engine.model, "config", None)
    layer = engine.layers[index]
    device = engine.compute_device(layer)  # never meta (meta weights: the CPU)
    tasks = engine.plan[index]
    if not tasks.prunes_anything():
        return None
    parts, kinds, experts = {}, tasks.by_kind(), (0, 0)
    if method.needs_calibration:
        hooked = {name: lin for name, (lin, _) in engine.hooked_linears(tasks).items()}
        per_input = (4 if "gram" in method.statistics else 0) * (2 if method.error_correction else 1)
        # an upper bound: Linears that share an input (q/k/v, gate/up) share one accumulator
        # in the engine, but which do is only known once the layer has run
        parts["statistics"] = sum(per_input * lin.in_features**2 + 4 * lin.in_features for lin in hooked.values())
        # fused MoE banks: one accumulator per expert and matrix, alive during the pass (or a chunk's)
        banks = [bank for kind, members in kinds.items() for bank in kind.statistics_banks(members, method)]
        if banks:
            experts = (max(b.num_experts for b in banks),
                       sum(per_input * b.in_features**2 + 4 * b.in_features for b in banks))
        batch = min(config.batch_size, num_windows)
        widest = max(m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
        heads = getattr(model_config, "num_attention_heads", 1) or 1
        parts["forward"] = 4 * batch * seqlen * (3 * widest + heads * seqlen)
    parts["solver"] = max([size for kind, members in kinds.items() for size in kind.solver_bytes(members, method)],
                          default=0)
    if checkpoint:
        parts["checkpoint"] = sum(kind.checkpoint_bytes(members) for kind, members in kinds.items())
    if any((home if p.device.type == "meta" and home is not None else p.device) != device
           for p in layer.parameters()):
        parts["layer weights"] = sum(p.numel() * p.element_size() for p in layer.parameters())
    return device, parts, experts


def expert_chunk(engine, num_windows: int, seqlen: int, input_device: torch.device, budget: dict[str, int],
                 home: torch.device | None = None, checkpoint: bool = False) -> int | None:
    """The experts whose statistics one pass collects, so that every MoE layer's working set fits
    ``budget`` (device -> bytes the prune's own work may use there): None when all experts fit in one
    pass; `PruningError` when not even one expert's statistics fit beside the rest of the layer."""
    activations = activation_bytes(engine, num_windows, seqlen, input_device)
    chunk, most = None, 0
    for index in range(len(engine.layers)):
        found = layer_parts(engine, index, num_windows, seqlen, home, checkpoint)
        if found is None or not found[2][0]:
            continue
        device, parts, (experts, per_expert) = found
        if str(device) not in budget:
            continue
        room = budget[str(device)] - sum(parts.values()) - activations.get(str(device), 0)
        fits = room // per_expert if per_expert else experts
        if fits < 1:
            raise PruningError(
                f"Not even one expert's statistics ({format_bytes(per_expert)}) fit in the {format_bytes(budget[str(device)])} "
                f"this prune may use on {device} beside the rest of decoder layer {index} "
                f"({format_bytes(sum(parts.values()) + activations.get(str(device), 0))}); free memory there (fewer "
                f"weights with --device-map / --max-memory), use fewer calibration samples, or a lighter method.")
        most = max(most, experts)
        chunk = int(fits) if chunk is None else min(chunk, int(fits))
    return None if chunk is None or chunk >= most else chunk


def _weight_file_mappings() -> tuple[list[tuple[int, int]], int]:
    """Address ranges of this process's memory-mapped weight files (``*.safetensors``, ``*.bin``)
    and the bytes of them resident now (Linux ``/proc/self/smaps``; elsewhere none)."""
    ranges, resident, current = [], 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                head = line.split()
                if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                    current = line.rstrip().endswith((".safetensors", ".bin"))
                    if current:
                        start, end = (int(x, 16) for x in head[0].split("-"))
                        ranges.append((start, end))
                elif current and head[:1] == ["Rss:"]:
                    resident += int(head[1]) * 1024
    except OSError:
        pass
    return ranges, resident


def profile_bytes(config, model_config, layers: int, act_bytes: int, num_windows: int) -> int:
    """Memory of the sparsity profile's passes over the whole model, before the prune starts: one
    forward batch's transients (no logits: the dense pass stops after the last layer), and for
    ``sensitivity`` every layer's cached output over its windows plus the head's float32 logits of
    one batch, about three copies in the loss (logits, their float copy, log-softmax)."""
    if config.sparsity_profile == "uniform" or num_windows == 0:
        return 0
    hidden = getattr(model_config, "hidden_size", 0) or 0
    heads = getattr(model_config, "num_attention_heads", 1) or 1
    widest = max(getattr(model_config, "intermediate_size", 0) or 0, hidden)
    batch = min(config.batch_size, num_windows)
    total = 4 * batch * config.seqlen * (3 * widest + heads * config.seqlen)
    if config.sparsity_profile == "sensitivity":
        samples = min(config.sensitivity_samples, num_windows)
        vocab = getattr(model_config, "vocab_size", 0) or 0
        total += layers * samples * config.seqlen * hidden * act_bytes
        total += 3 * 4 * min(batch, samples) * config.seqlen * vocab
    return total


def resident_bytes(model: nn.Module, home: torch.device) -> dict[str, int]:
    """Per device, what is held once the prune has touched every weight: all of the model's
    tensors (meta ones counted on ``home``, where they will be loaded), and on the CPU the
    process's memory besides them (libraries, the interpreter, data). Weights that are memory-mapped
    from their files count only once they are read, so the process's memory is taken without them
    and all weights are added."""
    import psutil

    ranges, mapped = _weight_file_mappings()
    held: dict[str, int] = {}
    anonymous = 0  # CPU weights in the process's own memory (already in its RSS)
    for tensor in list(model.parameters()) + list(model.buffers()):
        device = home if tensor.device.type == "meta" else tensor.device
        nbytes = tensor.numel() * tensor.element_size()
        held[str(device)] = held.get(str(device), 0) + nbytes
        if tensor.device.type == "cpu" and not any(a <= tensor.data_ptr() < b for a, b in ranges):
            anonymous += nbytes
    process = int(psutil.Process().memory_info().rss) - mapped - anonymous
    held["cpu"] = held.get("cpu", 0) + max(process, 0)
    return held


@dataclass
class PrunePlan:
    """What a prune would do and cost, worked out without touching a weight (`Pruner.plan`)."""

    method: str
    pattern: str
    layers: int
    tasks: dict[str, int]  # "Linears" / "channel groups" / "expert banks" / ... -> count
    targets: dict[str, int]  # target (e.g. "50%", "2:4", "remove 384 of 1536") -> tensors or groups
    working: MemoryEstimate  # the prune's own peak, per device, by part
    resident: dict[str, int]  # device -> bytes held before the prune (weights; libraries on the CPU)
    flops: dict[str, float]  # phase -> floating-point operations
    rate: float  # measured float32 matmul operations per second of the compute device
    tokens: int
    profile: dict[str, int] = field(default_factory=dict)  # device -> bytes of the profile's passes (before the prune)
    processes: int = 1  # processes sharing the prune (torchrun / accelerate launch)
    solve_share: float = 1.0  # the busiest process's share of the solve operations
    expert_chunk: tuple[int, int, int] | None = None  # MoE statistics in chunks: (experts per pass, experts, passes)
    recovery: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> the recovery's training, by part
    recovery_kind: str = ""  # "distillation" / "LoRA recovery" (with recovery)

    @property
    def peak_bytes(self) -> dict[str, int]:
        devices = set(self.working.parts) | set(self.resident) | set(self.profile) | set(self.recovery)
        return {d: self.resident.get(d, 0) + max(self.working.total(d), self.profile.get(d, 0),
                                                 sum(self.recovery.get(d, {}).values())) for d in sorted(devices)}

    @property
    def seconds(self) -> float:
        return sum(self.flops.values()) / self.rate

    def describe(self) -> str:
        lines = [f"plan: {self.method} ({self.pattern}) over {self.layers} decoder layers, {self.tokens:,} "
                 f"calibration tokens"]
        lines += [f"  {count} {what}" for what, count in self.tasks.items() if count]
        lines += [f"  target {target}: {count}" for target, count in self.targets.items()]
        for device, peak in self.peak_bytes.items():
            parts = self.working.describe(device) if device in self.working.parts else ""
            held = format_bytes(self.resident.get(device, 0))
            if self.profile.get(device):
                parts += f"; or, before the prune, the sparsity profile's passes {format_bytes(self.profile[device])}"
            if self.recovery.get(device):
                training = ", ".join(f"{what} {format_bytes(n)}" for what, n in self.recovery[device].items() if n)
                parts += (f"; or, after the prune, the {self.recovery_kind} "
                          f"{format_bytes(sum(self.recovery[device].values()))}: {training}")
            lines.append(f"  peak memory on {device}: about {format_bytes(peak)} (held before: {held}"
                         + (f"; {parts}" if parts else "") + ")")
        if self.expert_chunk is not None:
            chunk, experts, passes = self.expert_chunk
            lines.append(f"  MoE statistics in expert chunks: {chunk} of {experts} experts per pass, {passes} statistics "
                         f"passes per MoE layer (what the free memory allows)")
        if self.processes > 1:
            lines.append(f"  {self.processes} processes: each calibrates on 1/{self.processes} of the windows; each "
                         f"layer's solves are shared, the busiest process solving {self.solve_share:.0%} of the "
                         f"operations (1/{self.processes} = {1 / self.processes:.0%}); times below are that process's")
        phases = ", ".join(f"{phase} {flops / self.rate:.3g} s" for phase, flops in self.flops.items() if flops)
        lines.append(f"  time: about {self.seconds:.3g} s ({phases}; at {self.rate / 1e9:.0f} GFLOP/s measured on "
                     f"the compute device; a model of the cost, see docs/results/scaling.md)")
        return "\n".join(lines)


def working_budget(engine, input_device: torch.device, home: torch.device | None = None) -> dict[str, int]:
    """Per device the prune's own work may use (device -> bytes): what is free there now (where
    ``--device-map`` / ``--max-memory`` left room after placing the weights); in a plan-only run
    (weights on the meta device) less the weights that will be loaded onto ``home``."""
    devices = {str(engine.compute_device(layer)) for layer in engine.layers} | {str(input_device)}
    pending = sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()]
                  if t.device.type == "meta")
    budget = {}
    for device in devices:
        free = available_bytes(torch.device(device))
        if free is not None:
            budget[device] = max(free - (pending if home is not None and device == str(home) else 0), 0)
    return budget


def check_memory(engine, num_windows: int, seqlen: int, input_device: torch.device,
                 checkpoint: bool = False) -> MemoryEstimate:
    """Choose how many experts' statistics one pass collects (`expert_chunk`, from the memory each
    device offers, `working_budget`), then raise `PruningError` with the numbers when the estimate
    still exceeds what a device offers."""
    budget = working_budget(engine, input_device)
    engine.expert_chunk = expert_chunk(engine, num_windows, seqlen, input_device, budget, checkpoint=checkpoint)
    estimate = estimate_memory(engine, num_windows, seqlen, input_device, checkpoint=checkpoint)
    refuse_beyond(estimate, budget, "fewer calibration samples or a shorter seqlen (activations), offload layers "
                                    "with a device_map (weights), a lighter method")
    return estimate


def refuse_beyond(estimate: MemoryEstimate, budget: dict[str, int], remedies: str) -> None:
    """Log ``estimate`` per device and raise `PruningError` with the numbers where it exceeds ``budget``
    (device -> free bytes; a device left out is not checked). ``remedies``: what the user can change."""
    for device in estimate.parts:
        need, free = estimate.total(device), budget.get(device)
        logger.info("Memory estimate on %s: %s (free: %s)", device, estimate.describe(device),
                    "unknown" if free is None else format_bytes(free))
        if free is not None and need > free:
            raise PruningError(
                f"This prune needs about {format_bytes(need)} on {device} ({estimate.describe(device)}) but only "
                f"{format_bytes(free)} is free; use {remedies}, or skip this check (check_memory=False, "
                f"--skip-memory-check) if you know better."
            )


def free_on(device: torch.device) -> dict[str, int]:
    """``{device: bytes free there now}`` for `refuse_beyond`, or ``{}`` where that is unknown."""
    free = available_bytes(torch.device(device))
    return {} if free is None else {str(device): free}


def forward_bytes(model: nn.Module, layers: nn.ModuleList, rows: int, seqlen: int) -> int:
    """Peak of one whole-model forward pass over ``rows`` windows without a KV cache, beyond the weights:
    the transient tensors of the widest decoder layer (as `layer_parts` counts a layer's batch), the hidden
    states into and out of it, and the float32 logits with the loss's log-probabilities and its copy."""
    model_config = getattr(model, "config", None)
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    widest = max(m.out_features for m in linears)
    hidden = getattr(model_config, "hidden_size", None) or linears[0].in_features
    heads = getattr(model_config, "num_attention_heads", 1) or 1
    vocab = getattr(model_config, "vocab_size", 0) or 0
    return 4 * rows * seqlen * (3 * widest + heads * seqlen + 2 * hidden + 3 * vocab)
