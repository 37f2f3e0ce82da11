"""Model classes for structurally pruned models whose layers have different widths.

``modeling_pruned.py`` is self-contained (torch + transformers only) and is saved next to the
weights; `register` makes the classes known to ``AutoConfig`` / ``AutoModelForCausalLM`` so that
a heterogeneous checkpoint loads without ``trust_remote_code`` once optimum-prune is imported.
"""

from __future__ import annotations

from .modeling_pruned import LAYER_WIDTH_KEYS, PRUNED_CLASSES, layer_config


_REGISTERED = False


def register() -> None:
    """Register the pruned classes with the transformers Auto classes (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _REGISTERED = True


register()

__all__ = ["LAYER_WIDTH_KEYS", "PRUNED_CLASSES", "layer_config", "register"]
