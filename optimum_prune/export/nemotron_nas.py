"""Heterogeneous Llama / Mistral / Qwen2 outputs in the Nemotron-NAS form that serving engines read.

A structured prune that gives every decoder layer its own MLP width (or KV heads) is saved by
transformers in optimum-prune's own form (``optimum_pruned_<family>``, ``layer_widths``), which only
transformers loads. For the Llama family the same weights are also a Nemotron-NAS model
(``DeciLMForCausalLM``, one ``block_configs`` entry per layer; `modeling.modeling_nemotron_nas`):
vLLM serves it, and SGLang, TensorRT-LLM and MLX do when every width is on their 256 grid.
`to_nemotron_nas` rewrites a saved folder's ``config.json`` into that form and puts the modelling
file beside it (``trust_remote_code``); the weights do not change.

Not expressible (the folder keeps optimum-prune's form, `nemotron_nas_refusal` says why): a layer with
fewer query heads than the config (the form derives KV heads from a fixed query-head count), an
active sliding window, and every other family.
"""

from __future__ import annotations

import json
import os
import shutil

from ..errors import PruningError
from ..modeling import DeciLMConfig
from ..modeling import modeling_nemotron_nas as nas_modeling
from .families import active_window, family_of, layer_widths_of

#: families whose layers the Nemotron-NAS form describes
NAS_FAMILIES = ("llama", "mistral", "qwen2")
#: the MLP widths SGLang, TensorRT-LLM and MLX can read (``ffn_mult`` only)
FFN_MULT_GRID = 256

_MODELING_FILE = "modeling_nemotron_nas.py"
_DROPPED = ("layer_widths", "auto_map", "architectures", "model_type", "use_sliding_window", "sliding_window",
            "max_window_layers", "layer_types", "transformers_version", "qkv_bias")


def nemotron_nas_refusal(config: dict) -> str | None:
    """Why the heterogeneous model ``config`` (a ``config.json`` dict in optimum-prune's form) has no
    Nemotron-NAS form, or None."""
    family = family_of(config)
    if family not in NAS_FAMILIES:
        return f"the Nemotron-NAS form describes {', '.join(NAS_FAMILIES)} layers, not {family}"
    if active_window(config) is not None:
        return "its sliding-window attention has no Nemotron-NAS field"
    heads = config["num_attention_heads"]
    for index, widths in enumerate(config.get("layer_widths") or []):
        if widths.get("num_attention_heads", heads) != heads:
            return (f"layer {index} keeps {widths['num_attention_heads']} of {heads} query heads; the Nemotron-NAS "
                    f"form keeps every query head (prune KV groups alike in every layer, or leave attention whole)")
    return None


def ffn_entry(width: int, hidden: int) -> dict:
    """The ``ffn`` block of an MLP ``width`` wide: ``intermediate_size``, and ``ffn_mult`` too when the
    width is on the 256 grid (every engine then reads the same width)."""
    entry = {"no_op": False, "replace_with_linear": False, "intermediate_size": width}
    if width % FFN_MULT_GRID == 0:
        ffn_mult = width * 3 / (2 * hidden)
        if nas_modeling.ffn_mult_to_intermediate_size(ffn_mult, hidden) == width:
            entry["ffn_mult"] = ffn_mult
    return entry


#: a block the layer does not have (depth pruning at block granularity)
_NO_OP = {"no_op": True, "replace_with_linear": False}


def block_configs(config: dict) -> list[dict]:
    """One Nemotron-NAS block per layer of a ``config.json`` dict (stock or ``layer_widths``)."""
    heads = config["num_attention_heads"]
    blocks = []
    for index, widths in enumerate(layer_widths_of(config)):
        kv, width = widths["num_key_value_heads"], widths["intermediate_size"]
        if kv and heads % kv:
            raise PruningError(f"layer {index}: {heads} query heads do not split into {kv} KV groups.")
        attention = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // kv} if kv else _NO_OP
        ffn = ffn_entry(width, config["hidden_size"]) if width else _NO_OP
        blocks.append({"attention": dict(attention), "ffn": dict(ffn)})
    return blocks


def nemotron_nas_config(config: dict) -> dict:
    """The ``config.json`` (with ``auto_map``) of the model ``config`` describes, in the Nemotron-NAS form."""
    refusal = nemotron_nas_refusal(config)
    if refusal:
        raise PruningError(f"No Nemotron-NAS form: {refusal}.")
    blocks = block_configs(config)
    data = {key: value for key, value in config.items() if key not in _DROPPED}
    if family_of(config) == "qwen2":  # biases on q, k and v only
        data.update(attention_bias=False, qkv_bias=True)
    data["intermediate_size"] = max((block["ffn"]["intermediate_size"] for block in blocks if not block["ffn"]["no_op"]),
                                    default=config["intermediate_size"])
    data["block_configs"] = blocks
    converted = DeciLMConfig.from_dict(data).to_dict()  # validated by the config class
    for key in ("transformers_version", "_name_or_path"):
        converted.pop(key, None)
    converted["architectures"] = ["DeciLMForCausalLM"]
    converted["auto_map"] = {"AutoConfig": "modeling_nemotron_nas.DeciLMConfig",
                             "AutoModelForCausalLM": "modeling_nemotron_nas.DeciLMForCausalLM"}
    return converted


def to_nemotron_nas(folder: str | os.PathLike) -> str | None:
    """Rewrite the heterogeneous output saved in ``folder`` into the Nemotron-NAS form (``config.json``
    and the modelling file; the weights stay). Returns None when done, else why the folder keeps
    optimum-prune's form. A folder whose layers all have the same widths is a stock checkpoint and is
    left as it is."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not config.get("layer_widths"):
        return "every layer has the same widths: a stock checkpoint"
    refusal = nemotron_nas_refusal(config)
    if refusal:
        return refusal
    converted = nemotron_nas_config(config)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(converted, handle, indent=2, sort_keys=True)
        handle.write("\n")
    shutil.copyfile(nas_modeling.__file__, os.path.join(folder, _MODELING_FILE))
    os.replace(partial, path)
    stale = os.path.join(folder, "modeling_pruned.py")  # written by save_pretrained for the other form
    if os.path.exists(stale):
        os.remove(stale)
    return None
