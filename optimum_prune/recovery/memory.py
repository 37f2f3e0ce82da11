"""The memory a recovery's training holds at its peak beyond the model's own weights, by part: for
the plan-only run (``--dry-run``, `Pruner.plan`) and the check a run makes before any work.

Distillation trains every parameter: a gradient and AdamW's two moments per parameter, the teacher's
weights (a copy of the dense model, in ``teacher_dtype`` when given; offloaded, ``teacher_place``, only
its largest module on the device at a time), the student's and the teacher's
logits in float32 with their log-softmax copies and the student's gradient, the zeros of an
unstructured prune (one byte per Linear weight), the teacher's hidden states when the loss has a
hidden-state term, and the activations the backward pass keeps (plain fine-tuning, ``ce_weight=1``,
holds no teacher; distillation through LoRA adapters, ``lora_rank``, trains and keeps what LoRA
does). LoRA
trains the adapters only (their weights, gradients and moments), the logits of one model, and
keeps more activations per token (each adapter's input copy and its low-rank product).

The activations are counted per token and decoder layer as ``a x hidden + b x intermediate``
values, the constants fitted on SmolLM2-135M in float32 on the CPU: the peak RSS of two training steps
at 4 x 512, 2 x 256 and 1 x 1024 tokens, the model's weights and the libraries measured before; the
estimate is within 0.99-1.04x of every one of those six runs (docs/results/distill.md). No seqlen
term showed: the attention runs through SDPA, which keeps no seqlen x seqlen scores.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.resources import available_bytes
from ..errors import PruningError, format_bytes
from ..structure.layers import find_decoder_layers, select_target_linears

#: (a, b) of the activations kept for the backward pass, values per token and decoder layer
ACTIVATIONS = {"distill": (6.0, 6.0), "lora": (12.0, 11.0)}
#: float32 copies of the logits at the loss: distillation's student logits, their log-softmax and
#: gradient, the teacher's logits and log-softmax (plus a temperature-scaled copy); LoRA's
#: cross-entropy: the logits, their log-softmax and gradient, and the shifted copy
LOGIT_COPIES = {"distill": 6, "lora": 4}


def training_memory(model: nn.Module, recovery, seqlen: int, processes: int = 1) -> dict[str, int]:
    """Bytes the recovery ``recovery`` (a `workflow.Recovery`) holds at its peak on the model's device
    beyond the model's weights, by part, in the busiest of ``processes`` data-parallel processes (each
    trains on its part of every batch). Works on a model with meta weights (a plan-only run)."""
    kind = "distill" if recovery.distill is not None else "lora"
    settings = recovery.distill if kind == "distill" else recovery.lora
    rank = settings.lora_rank if kind == "distill" else settings.rank  # distillation through adapters: rank > 0
    config = getattr(model, "config", None)
    params = list(model.parameters())
    count, element = sum(p.numel() for p in params), params[0].element_size()
    _, layers = find_decoder_layers(model)
    hidden = getattr(config, "hidden_size", 0) or 0
    intermediate = getattr(config, "intermediate_size", 0) or hidden * 4
    vocab = getattr(config, "vocab_size", 0) or 0
    tokens = -(-min(settings.batch_size, recovery.samples) // max(1, processes)) * seqlen
    a, b = ACTIVATIONS["lora" if rank else "distill"]
    parts = {"activations": int(tokens * len(layers) * (a * hidden + b * intermediate) * element),
             "logits": int(LOGIT_COPIES[kind] * tokens * vocab * 4)}
    linears = [linear for i, layer in enumerate(layers) for linear in select_target_linears(layer, str(i), None, None).values()]
    if kind == "distill":
        parts.update(_teacher(model, recovery, count, element) if settings.needs_teacher else {})
        if settings.hidden_weight:  # the teacher's hidden states, held for the hidden-state term
            parts["teacher hidden states"] = tokens * (len(layers) + 1) * hidden * 4
        if not rank:
            parts["gradients and optimiser"] = 3 * count * element
        parts["masks"] = sum(linear.weight.numel() for linear in linears)
    if rank:
        adapters = sum(rank * (linear.in_features + linear.out_features) for linear in linears)
        parts["adapters, gradients and optimiser"] = 4 * adapters * 4
    return parts


def _teacher(model: nn.Module, recovery, count: int, element: int) -> dict[str, int]:
    """The teacher's weights on the model's device: all of them, or — offloaded to disk, or to host
    memory from an accelerator (``teacher_place``) — the largest module's, brought in for its forward."""
    itemsize = getattr(torch, recovery.teacher_dtype).itemsize if recovery.teacher_dtype else element
    place = getattr(recovery, "teacher_place", "device")
    device = next(model.parameters()).device
    if place == "device" or (place == "cpu" and device.type in ("cpu", "meta")):  # meta: a plan, on the CPU
        return {"teacher": count * itemsize}
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return {f"teacher (offloaded to {place}, one module at a time)": largest * itemsize}


def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{what} {format_bytes(nbytes)}" for what, nbytes in parts.items() if nbytes)


def check_training_memory(model: nn.Module, recovery, seqlen: int, processes: int = 1) -> None:
    """Refuse, before any work, a recovery whose training will not fit in the free memory of the
    model's device (one `PruningError` line naming the fixes)."""
    device = next(model.parameters()).device
    parts = training_memory(model, recovery, seqlen, processes)
    free = available_bytes(device)
    if free is not None and sum(parts.values()) > free:
        kind = "distillation" if recovery.distill is not None else "LoRA recovery"
        raise PruningError(f"The {kind} after the prune needs about {format_bytes(sum(parts.values()))} on {device} "
                           f"({describe(parts)}) but only {format_bytes(free)} is free; lower --recover-batch-size or "
                           f"--seqlen, keep the teacher in bfloat16 (--recover-teacher-dtype) or off the device (--recover-teacher "
                           f"cpu / disk), or recover with LoRA.")
