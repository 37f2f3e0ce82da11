"""Recovery of a pruned model's quality by short training: LoRA with PEFT merged back, or
distillation of every parameter from the dense model."""

from .distill import DistillConfig, distillation_loss, hidden_state_loss, loss_is_kl, recover_distill
from .lora import LoraRecoveryConfig, recover_lora


__all__ = ["DistillConfig", "DistillationTrainer", "LoraRecoveryConfig", "distillation_loss", "hidden_state_loss",
           "loss_is_kl", "recover_distill", "recover_lora"]


def __getattr__(name):
    if name == "DistillationTrainer":  # imports transformers' Trainer: only when asked for
        from .trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
