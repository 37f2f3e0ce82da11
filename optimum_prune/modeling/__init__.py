"""Model classes for structurally pruned models whose layers have different widths.

``modeling_pruned.py`` (every supported family, ``layer_widths``) and ``modeling_nemotron_nas.py``
(Llama-family layers in the Nemotron-NAS form that serving engines read, ``block_configs``) are
self-contained (torch + transformers only) and are saved next to the weights; `register` makes the
classes known to ``AutoConfig`` / ``AutoModelForCausalLM`` so that a heterogeneous checkpoint loads
without ``trust_remote_code`` once optimum-prune is imported.
"""

from __future__ import annotations

from .modeling_nemotron_nas import DeciLMConfig, DeciLMForCausalLM
from .modeling_pruned import (BLOCK_MODULES, LAYER_WIDTH_KEYS, PRUNED_CLASSES, absent_blocks, build_layer, drop_block,
                              layer_config)


_REGISTERED = False


def register() -> None:
    """Register the pruned classes with the transformers Auto classes (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_class, model_class in [*PRUNED_CLASSES.values(), (DeciLMConfig, DeciLMForCausalLM)]:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _REGISTERED = True


register()

__all__ = ["BLOCK_MODULES", "LAYER_WIDTH_KEYS", "PRUNED_CLASSES", "DeciLMConfig", "DeciLMForCausalLM", "absent_blocks",
           "build_layer", "drop_block", "layer_config", "register"]
