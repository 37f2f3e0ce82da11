"""Recovery after pruning by distillation from the unpruned model (Minitron's recipe).

The dense model the prune started from is the teacher; the pruned model (the student) is trained,
every parameter, to match the teacher's next-token distribution: the loss is the forward KL
divergence ``KL(p_teacher || p_student)`` of the logits at a temperature ``T`` (scaled by ``T^2``
so that its gradients keep their size across temperatures), averaged over tokens. Two optional terms:
``ce_weight`` mixes in the next-token cross-entropy on the training text (the loss becomes
``(1 - ce_weight) KL + ce_weight CE``; ``ce_weight=1`` without a hidden term is plain
full-parameter fine-tuning and needs no teacher), and ``hidden_weight`` adds Minitron's
intermediate-state term: the squared distance of the student's hidden states to the teacher's,
relative to the teacher's, per token, averaged over the decoder layers' outputs when the student has the
teacher's depth (width pruning, ``no_op`` blocks) and over the final hidden state when layers were
removed (where else the shapes match). Unstructured
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
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PruningError, check_int, check_positive_int, check_positive_number
from ..runtime.offload import input_device
from ..runtime.distributed import average_gradients, batch_share, is_main_process, synchronize, world_size
from ..structure.layers import find_decoder_layers, select_target_linears
from .lora import attach_adapters, merge_adapters
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
        ce_weight: share of the next-token cross-entropy in the loss (0: KL only; 1: cross-entropy
            only, i.e. fine-tuning). Default 0.5: on SmolLM2-135M, FASP 20%, three seeds, better than
            KL alone on both held-out texts on every seed (docs/results/distill.md).
        hidden_weight: weight of the hidden-state term added to the loss (0: none).
        lora_rank: train LoRA adapters of this rank on the decoder Linears (merged back) instead of
            every parameter, when memory is short (0: every parameter).
        lora_alpha: their scaling numerator (default ``2 * lora_rank``).
        seed: order of the windows.
        weight_decay: AdamW weight decay.
        save_every: with a ``checkpoint_dir``, save the training state every this many steps.
    """

    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    temperature: float = 1.0
    ce_weight: float = 0.5
    hidden_weight: float = 0.0
    lora_rank: int = 0
    lora_alpha: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    save_every: int = 10

    def __post_init__(self):
        check_training_settings(self.steps, self.lr, self.batch_size, self.seed, self.weight_decay)
        check_positive_number(self.temperature, "distillation temperature")
        check_positive_int(self.save_every, "distillation save_every")
        for name in ("ce_weight", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise PruningError(f"distillation {name} must be a non-negative number, got {value!r}.")
        check_int(self.lora_rank, "distillation lora_rank", 0)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        check_int(self.lora_alpha, "distillation lora_alpha", 0)
        if self.ce_weight > 1:
            raise PruningError(f"distillation ce_weight is a share of the loss (0 to 1), got {self.ce_weight!r}.")

    @property
    def needs_teacher(self) -> bool:
        """False only for plain fine-tuning (cross-entropy alone, no hidden term)."""
        return self.ce_weight < 1 or self.hidden_weight > 0


def loss_is_kl(config) -> bool:
    """Whether the training loss is the KL alone (no cross-entropy share, no hidden term); takes a
    `DistillConfig` or the dict of one a run recorded."""
    get = config.get if isinstance(config, dict) else lambda name, default: getattr(config, name, default)
    return not get("ce_weight", 0.0) and not get("hidden_weight", 0.0)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over tokens (float32); with
    ``mask`` (the batch's ``attention_mask``), over the tokens it keeps."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    if mask is None:
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    keep = mask.reshape(-1).to(student.device, torch.bool)
    per_token = F.kl_div(student[keep], teacher[keep], log_target=True, reduction="none").sum(-1)
    return per_token.sum() / keep.sum().clamp_min(1) * temperature**2


def hidden_state_loss(student_states, teacher_states) -> torch.Tensor:
    """``||h_s - h_t||^2 / ||h_t||^2`` per token, averaged over the tokens and the matched hidden
    states (float32): every decoder layer's output when the student has the teacher's depth, the
    final state otherwise. A mean over tokens, so data-parallel parts of a batch average to it."""
    if len(student_states) != len(teacher_states):
        student_states, teacher_states = student_states[-1:], teacher_states[-1:]
    else:
        student_states, teacher_states = student_states[1:], teacher_states[1:]  # the embeddings are the same input
    terms = []
    for student, teacher in zip(student_states, teacher_states):
        teacher = teacher.float().to(student.device)
        distance = (student.float() - teacher).pow(2).sum(-1)
        terms.append((distance / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def sparsity_masks(model: nn.Module) -> dict[nn.Linear, torch.Tensor]:
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
        """Written by one process (every process holds the same state), the others waiting for it."""
        if is_main_process():
            os.makedirs(self.directory, exist_ok=True)
            tmp = self.path + ".tmp"
            torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": self.step, "losses": self.losses, "order": self.order,
                        "generator": self.generator.get_state()}, tmp)
            os.replace(tmp, self.path)
        synchronize()

    def clear(self) -> None:
        synchronize()  # every process is past its last read
        if is_main_process() and self.path and os.path.isfile(self.path):
            os.remove(self.path)

    def next_batch(self, windows: torch.Tensor) -> torch.Tensor:
        size = self.config.batch_size
        if self.order.numel() < size:
            self.order = torch.cat([self.order, torch.randperm(windows.shape[0], generator=self.generator)])
        batch, self.order = windows[self.order[:size]], self.order[size:]
        return batch


def _fingerprint(config: DistillConfig, windows: torch.Tensor) -> dict:
    found = {"config": asdict(config), "windows": tuple(windows.shape), "sum": int(windows.sum())}
    if world_size() > 1:  # a state saved by another number of processes took other gradients
        found["processes"] = world_size()
    return found


def _check_inputs(model: nn.Module, teacher: nn.Module | None, windows, config: DistillConfig) -> None:
    if teacher is None:
        if config.needs_teacher:
            raise PruningError("Distillation needs the dense model as teacher (only ce_weight=1 without a hidden term "
                               "trains without one).")
        check_training_inputs("Fine-tuning", windows, model)
        return
    check_training_inputs("Distillation", windows, model)  # the teacher is only read: it may be offloaded
    if model.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise PruningError("The teacher's vocabulary differs from the pruned model's; distil from the model the "
                           "prune started from.")


def training_loss(model: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, config: DistillConfig,
                  attention_mask: torch.Tensor | None = None):
    """(the training loss of one batch, the student's output): the KL to the teacher's logits, the
    cross-entropy share and the hidden-state term, as ``config`` weighs them (the teacher without
    gradients). With ``attention_mask`` (padded batches) the KL and the cross-entropy count the
    tokens it keeps; the hidden-state term counts every token."""
    hidden = config.hidden_weight > 0
    masked = {} if attention_mask is None else {"attention_mask": attention_mask}
    target = None
    if teacher is not None:
        with torch.no_grad():
            device = input_device(teacher)
            target = teacher(input_ids=batch.to(device), use_cache=False, output_hidden_states=hidden,
                             **{k: v.to(device) for k, v in masked.items()})
    output = model(input_ids=batch, use_cache=False, output_hidden_states=hidden, **masked)
    loss = torch.zeros((), device=output.logits.device)
    if config.ce_weight < 1:
        kl = distillation_loss(output.logits, target.logits.to(output.logits.device), config.temperature,
                               attention_mask)
        loss = loss + (1 - config.ce_weight) * kl
    if config.ce_weight > 0:
        vocab = output.logits.shape[-1]
        labels = batch[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:].to(labels.device) == 0, -100)
        ce = F.cross_entropy(output.logits[:, :-1].float().reshape(-1, vocab), labels.reshape(-1))
        loss = loss + config.ce_weight * ce
    if hidden:
        if output.hidden_states is None or target.hidden_states is None:
            raise PruningError("This model does not return its hidden states; distil with hidden_weight=0.")
        loss = loss + config.hidden_weight * hidden_state_loss(output.hidden_states, target.hidden_states)
    return loss, output


def _train(model, teacher, windows, config: DistillConfig, state: _TrainingState, optimizer, fingerprint: dict,
           progress: bool, masks: dict) -> None:
    """The steps from ``state.step`` on (``model``: the student, wrapped by peft when adapters
    train): teacher logits without gradients, the loss, AdamW, the sparsity zeros put back, the
    state saved every ``save_every`` steps."""
    device = model.get_input_embeddings().weight.device
    bar = tqdm(range(state.step, config.steps), total=config.steps, initial=state.step, desc="distillation",
               unit="step", disable=not progress)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for step in bar:
        batch, share = batch_share(state.next_batch(windows))  # several processes: this one's part
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, config.steps, config.lr)
        with torch.enable_grad():
            loss, _ = training_loss(model, teacher, batch.to(device), config)
            loss.backward()
        value = average_gradients(params, share, loss)  # the whole batch's gradient and loss on every process
        if not math.isfinite(value):
            raise PruningError(f"Distillation diverged at step {step} (loss {value}); lower the lr.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # trained inside the sparsity pattern
            for linear, zeros in masks.items():
                linear.weight.masked_fill_(zeros, 0)
        state.step, state.losses = step + 1, [*state.losses, value]
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        if state.directory and (state.step % config.save_every == 0 or state.step == config.steps):
            state.save(model, optimizer, fingerprint)


def recover_distill(
    model: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    config: DistillConfig | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Train every parameter of ``model`` (pruned, in place; LoRA adapters merged back with
    ``lora_rank``) to match ``teacher`` (the dense model) on ``windows`` (n x seqlen token ids),
    its sparsity zeros kept (``teacher`` None: plain fine-tuning, with
    ``DistillConfig(ce_weight=1)``); with ``checkpoint_dir``, save the training state there and
    continue an interrupted run from it. Returns what was done: the
    settings, the training loss per step and of the first and last tenth, tokens, seconds."""
    config = config or DistillConfig()
    _check_inputs(model, teacher, windows, config)
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    was_training = model.training
    masks = sparsity_masks(model)
    if config.lora_rank:  # adapters only (their base weights frozen by peft), merged back at the end
        student = attach_adapters(model, config.lora_rank, config.lora_alpha, seed=config.seed)
    else:
        student = model
        for param in model.parameters():
            param.requires_grad_(True)
    params = [param for param in student.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = _TrainingState(config, os.fspath(checkpoint_dir) if checkpoint_dir is not None else None)
    fingerprint = _fingerprint(config, windows)
    try:
        if state.load(student, optimizer, fingerprint):
            logger.info("Resuming distillation at step %d of %d.", state.step, config.steps)
        start = time.perf_counter()
        if teacher is not None:
            teacher.eval()
        student.train()
        _train(student, teacher, windows, config, state, optimizer, fingerprint, progress, masks)
    finally:
        if student is not model:
            merge_adapters(student, model)
            with torch.no_grad():  # the merged update is dense: the zeros go back
                for linear, zeros in masks.items():
                    linear.weight.masked_fill_(zeros, 0)
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
