"""Distillation inside `transformers.Trainer`: the loss `recover_distill` trains with (forward KL to the
dense teacher's logits, optionally a cross-entropy share and the hidden-state term, `DistillConfig`)
as a Trainer's ``compute_loss``, and the zeros of an unstructured or N:M prune put back after every
optimiser step by a callback.

`recover_distill` is the short recovery the pruner runs; this is for the longer one users run
themselves, with what Trainer brings: their own datasets and collators (padded batches: the loss
counts the tokens ``attention_mask`` keeps), accelerate / DeepSpeed / FSDP launches, mixed
precision, logging, evaluation and checkpoints. Train adapters by passing a peft model as ``model``
(``DistillConfig.lora_rank`` is `recover_distill`'s own way and is refused here).

    trainer = DistillationTrainer(model=pruned, teacher=dense, distill_config=DistillConfig(ce_weight=0.5),
                                  args=TrainingArguments("out", max_steps=1000), train_dataset=dataset)
    trainer.train()
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ..errors import PruningError
from .distill import DistillConfig, sparsity_masks, training_loss


class KeepZeros(TrainerCallback):
    """Puts the zeros of ``masks`` (`distill.sparsity_masks`: Linear -> boolean mask) back after every
    optimiser step, so that the model is trained inside its sparsity pattern."""

    def __init__(self, masks: dict):
        self.masks = masks

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            for linear, zeros in self.masks.items():
                linear.weight.masked_fill_(zeros.to(linear.weight.device), 0)


class DistillationTrainer(Trainer):
    """`transformers.Trainer` whose loss is the distillation loss of ``distill_config`` against
    ``teacher`` (the dense model the prune started from; None only for plain fine-tuning,
    ``DistillConfig(ce_weight=1)``). The teacher runs without gradients, on the training device
    unless accelerate offloads it (`runtime.offload.offloaded_copy`); the sparsity zeros the model
    holds when the trainer is made are kept through training. The config's optimiser settings
    (steps, lr, batch size, seed) are not used: ``args`` (`TrainingArguments`) has them."""

    def __init__(self, *args, teacher=None, distill_config: DistillConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_config = distill_config or DistillConfig()
        if teacher is None and self.distill_config.needs_teacher:
            raise PruningError("DistillationTrainer needs the dense model as teacher= (only ce_weight=1 without a "
                               "hidden term trains without one).")
        if self.distill_config.lora_rank:
            raise PruningError("DistillationTrainer trains the model it is given: for adapters pass a peft model "
                               "(get_peft_model) and leave lora_rank at 0.")
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
            if not any(getattr(module, "_hf_hook", None) is not None for module in teacher.modules()):
                teacher.to(self.args.device)
        self.add_callback(KeepZeros(sparsity_masks(self.model)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = training_loss(model, self.teacher, inputs["input_ids"], self.distill_config,
                                      inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss
