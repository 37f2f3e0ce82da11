"""Facts about a saved model's ``config.json`` (a dict) that the export formats share."""

from __future__ import annotations

_NAS = "nemotron-nas"
_PRUNED = "optimum_pruned_"


def family_of(config: dict) -> str:
    """The stock family of a ``config.json``: ``optimum_pruned_<family>`` -> family; a Nemotron-NAS
    folder -> ``qwen2`` when it has q/k/v biases only, else ``llama``."""
    model_type = config.get("model_type", "")
    if model_type == _NAS:
        return "qwen2" if config.get("qkv_bias") else "llama"
    return model_type[len(_PRUNED):] if model_type.startswith(_PRUNED) else model_type


def is_nemotron_nas(config: dict) -> bool:
    return config.get("model_type") == _NAS


def is_heterogeneous(config: dict) -> bool:
    """Whether the layers differ in width (optimum-prune's ``layer_widths`` or the Nemotron-NAS blocks)."""
    return bool(config.get("layer_widths")) or is_nemotron_nas(config)


def active_window(config: dict) -> int | None:
    """The sliding window the model attends over, when it is shorter than its context, else None."""
    window = config.get("sliding_window")
    if family_of(config) == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if window is None or window >= config.get("max_position_embeddings", 0):
        return None
    return window


def layer_widths_of(config: dict) -> list[dict]:
    """Each decoder layer's ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``
    of a stock or optimum-prune-form ``config.json`` (``layer_widths`` entries over the global fields;
    0 for a block the layer does not have, ``no_op``)."""
    heads = config["num_attention_heads"]
    common = {"num_attention_heads": heads, "num_key_value_heads": config.get("num_key_value_heads") or heads,
              "intermediate_size": config["intermediate_size"]}
    own = config.get("layer_widths") or [{}] * config["num_hidden_layers"]
    widths = []
    for entry in own:
        layer = {**common, **{key: value for key, value in entry.items() if key in common}}
        if "attention" in entry.get("no_op", ()):
            layer.update(num_attention_heads=0, num_key_value_heads=0)
        if "mlp" in entry.get("no_op", ()):
            layer["intermediate_size"] = 0
        widths.append(layer)
    return widths
