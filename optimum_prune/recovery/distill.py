"""Recovery after pruning by distillation from the unpruned model (Minitron's recipe).

The dense model the prune started from is the teacher; the pruned model (the student) is trained,
every parameter, to match the teacher's next-token distribution: the loss is the forward KL
divergence ``KL(p_teacher || p_student)`` of the logits at a temperature ``T`` (scaled by ``T^2``
so that its gradients keep their size across temperatures), averaged over tokens. Unstructured
and N:M zeros are kept through training (the mask is put back after every optimiser step, so the
student is trained inside its sparsity pattern); structured models are small dense models and keep
their shapes. The teacher runs without gradients, in its own dtype (``teacher_dtype`` can halve its
memory).

An interrupted recovery continues from its last saved step: with ``checkpoint_dir``, every
``save_every`` steps the student's weights, the optimiser state, the step, the window order still
to come and the losses so far are written (atomically); the same call with the same arguments
continues from there and ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PruningError, check_positive_int, check_positive_number
from ..structure.layers import find_decoder_layers, select_target_linears
from .training import check_training_inputs, check_training_settings, warmup_cosine


logger = logging.getLogger(__name__)

STATE_NAME = "distill-state.pt"


@dataclass
class DistillConfig:
    """Settings of `recover_distill`.

    Args:
        steps: optimiser steps.
        lr: peak learning rate of AdamW (linear warm-up over 10% of the steps, cosine decay).
        batch_size: windows per step.
        temperature: of both softmaxes in the KL divergence.
        seed: order of the windows.
        weight_decay: AdamW weight decay.
        save_every: with a ``checkpoint_dir``, save the training state every this many steps.
    """

    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    temperature: float = 1.0
    seed: int = 0
    weight_decay: float = 0.0
    save_every: int = 10

    def __post_init__(self):
        check_training_settings(self.steps, self.lr, self.batch_size, self.seed, self.weight_decay)
        check_positive_number(self.temperature, "distillation temperature")
        check_positive_int(self.save_every, "distillation save_every")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over tokens (float32)."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def _sparsity_masks(model: nn.Module) -> dict[nn.Linear, torch.Tensor]:
    """The zeros of the decoder layers' Linears that hold any (an unstructured or N:M prune's)."""
    prefix, layers = find_decoder_layers(model)
    masks = {}
    for index, layer in enumerate(layers):
        for linear in select_target_linears(layer, f"{prefix}.{index}", None, None).values():
            zeros = linear.weight.detach() == 0
            if zeros.any():
                masks[linear] = zeros
    return masks


class _TrainingState:
    """What a resumed recovery needs: step, the window order still to come, the generator that draws
    the next orders, the losses so far, and (in the file) the student's weights and the optimiser."""

    def __init__(self, config: DistillConfig, checkpoint_dir: str | None):
        self.config, self.directory = config, checkpoint_dir
        self.step, self.losses = 0, []
        self.order = torch.empty(0, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def path(self) -> str | None:
        return os.path.join(self.directory, STATE_NAME) if self.directory else None

    def load(self, model: nn.Module, optimizer, fingerprint: dict) -> bool:
        if not self.path or not os.path.isfile(self.path):
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise PruningError(f"{self.path} holds a recovery with other settings or data; use another checkpoint "
                               f"folder (or delete this file) to start over.")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        self.step, self.losses, self.order = saved["step"], list(saved["losses"]), saved["order"]
        self.generator.set_state(saved["generator"])
        return True

    def save(self, model: nn.Module, optimizer, fingerprint: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = self.path + ".tmp"
        torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": self.step, "losses": self.losses, "order": self.order,
                    "generator": self.generator.get_state()}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        if self.path and os.path.isfile(self.path):
            os.remove(self.path)

    def next_batch(self, windows: torch.Tensor) -> torch.Tensor:
        size = self.config.batch_size
        if self.order.numel() < size:
            self.order = torch.cat([self.order, torch.randperm(windows.shape[0], generator=self.generator)])
        batch, self.order = windows[self.order[:size]], self.order[size:]
        return batch


def _fingerprint(config: DistillConfig, windows: torch.Tensor) -> dict:
    return {"config": asdict(config), "windows": tuple(windows.shape), "sum": int(windows.sum())}


def _check_inputs(model: nn.Module, teacher: nn.Module, windows) -> None:
    check_training_inputs("Distillation", windows, model, teacher)
    if model.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise PruningError("The teacher's vocabulary differs from the pruned model's; distil from the model the "
                           "prune started from.")


def _train(model, teacher, windows, config: DistillConfig, state: _TrainingState, optimizer, fingerprint: dict,
           progress: bool) -> None:
    """The steps from ``state.step`` on: teacher logits without gradients, the KL loss, AdamW, the
    sparsity zeros put back, the state saved every ``save_every`` steps."""
    device = model.get_input_embeddings().weight.device
    masks = _sparsity_masks(model)
    bar = tqdm(range(state.step, config.steps), total=config.steps, initial=state.step, desc="distillation",
               unit="step", disable=not progress)
    for step in bar:
        batch = state.next_batch(windows).to(device)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, config.steps, config.lr)
        with torch.no_grad():
            target = teacher(input_ids=batch.to(teacher.get_input_embeddings().weight.device), use_cache=False).logits
        with torch.enable_grad():
            logits = model(input_ids=batch, use_cache=False).logits
            loss = distillation_loss(logits, target.to(logits.device), config.temperature)
            if not torch.isfinite(loss):
                raise PruningError(f"Distillation diverged at step {step} (loss {float(loss)}); lower the lr.")
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # trained inside the sparsity pattern
            for linear, zeros in masks.items():
                linear.weight.masked_fill_(zeros, 0)
        state.step, state.losses = step + 1, [*state.losses, float(loss.detach())]
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        if state.directory and (state.step % config.save_every == 0 or state.step == config.steps):
            state.save(model, optimizer, fingerprint)


def recover_distill(
    model: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: DistillConfig | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Train every parameter of ``model`` (pruned, in place) to match ``teacher`` (the dense model)
    on ``windows`` (n x seqlen token ids), its sparsity zeros kept; with ``checkpoint_dir``, save
    the training state there and continue an interrupted run from it. Returns what was done: the
    settings, the training loss per step and of the first and last tenth, tokens, seconds."""
    config = config or DistillConfig()
    _check_inputs(model, teacher, windows)
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    was_training = model.training
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = _TrainingState(config, os.fspath(checkpoint_dir) if checkpoint_dir is not None else None)
    fingerprint = _fingerprint(config, windows)
    if state.load(model, optimizer, fingerprint):
        logger.info("Resuming distillation at step %d of %d.", state.step, config.steps)
    start = time.perf_counter()
    teacher.eval()
    model.train()
    try:
        _train(model, teacher, windows, config, state, optimizer, fingerprint, progress)
    finally:
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, False))
    state.clear()
    losses = state.losses
    tenth = max(1, len(losses) // 10)
    return {
        "method": "distill",
        **asdict(config),
        "losses": losses,
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens": config.steps * config.batch_size * int(windows.shape[1]),
        "seconds": time.perf_counter() - start,
    }
