"""Recovery of a pruned model's quality by short fine-tuning (LoRA with PEFT, merged back)."""

from .lora import LoraRecoveryConfig, recover_lora


__all__ = ["LoraRecoveryConfig", "recover_lora"]
