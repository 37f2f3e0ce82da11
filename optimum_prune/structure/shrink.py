"""Physically smaller models: slice Linears, drop decoder layers, describe the result in the config.

After a structured prune every decoder layer may have its own MLP width and head count.
`describe_widths` writes what the model now is into its config:

- every layer the same: the stock fields (``intermediate_size`` / ``ffn_dim``,
  ``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``), so the checkpoint
  loads with plain transformers, no plugin, provided the stock config class accepts the values;
- otherwise: the global fields stay as they were, ``layer_widths`` lists each layer's own values,
  and the model and its config become the ``optimum_prune.modeling`` classes (subclasses of the
  stock ones), whose ``save_pretrained`` writes ``auto_map`` and the modelling file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import PruningError
from ..modeling import BLOCK_MODULES, PRUNED_CLASSES, absent_blocks, build_layer, drop_block, layer_config
from .groups import (LAYOUTS, ChannelGroup, assign_offsets, attention_rows, base_model_type, head_dim_of,
                     unit_indices)
from .moe import expert_channel_modules, expert_count_key, expert_width_key, moe_blocks
from .layers import find_decoder_layers


#: ``set_param(linear, "weight" | "bias", tensor)``: how new parameters are written (the engine
#: passes one that also updates accelerate's offload store).
ParamSetter = Callable[[nn.Linear, str, torch.Tensor], None]


def replace_param(linear: nn.Linear, name: str, value: torch.Tensor) -> None:
    """Give ``linear`` a new parameter ``name`` of a new shape, on its device and in its dtype."""
    old = getattr(linear, name)
    setattr(linear, name, nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad))


def _sync_features(linear: nn.Linear) -> None:
    linear.out_features, linear.in_features = linear.weight.shape


def shrink_group(
    group: ChannelGroup,
    keep: torch.Tensor,
    weights: dict[str, torch.Tensor],
    consumer_weight: torch.Tensor | None = None,
    set_param: ParamSetter = replace_param,
) -> None:
    """Keep only units ``keep`` (sorted indices) of ``group``.

    ``weights`` holds the current float32 weights of the group's Linears (by full name) and the
    producers' biases (``<name>.bias``);
    ``consumer_weight`` is the consumer's new weight on the kept columns (a method's restoration)
    or None to slice the existing one. Biases of producers are sliced with their rows.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if keep.numel() < 1:
        raise PruningError(f"{group.name}: a structured prune must keep at least one unit.")
    kept_rows: dict[int, tuple] = {}  # Linear -> (a producer naming it, its kept rows per producer)
    for producer in group.producers:
        rows = unit_indices(keep, producer.rows_per_unit).to(weights[producer.name].device)
        kept_rows.setdefault(id(producer.linear), (producer, []))[1].append(rows + producer.offset)
    for producer, parts in kept_rows.values():  # a fused Linear keeps its slices' rows, in order
        rows = torch.cat(parts)
        set_param(producer.linear, "weight", weights[producer.name].index_select(0, rows))
        if producer.linear.bias is not None:
            set_param(producer.linear, "bias", weights[producer.name + ".bias"].index_select(0, rows))
        _sync_features(producer.linear)
    assign_offsets(group.producers, keep.numel())
    if consumer_weight is None:
        cols = unit_indices(keep, group.cols_per_unit).to(weights[group.consumer_name].device)
        consumer_weight = weights[group.consumer_name].index_select(1, cols)
    expected = keep.numel() * group.cols_per_unit
    if consumer_weight.shape != (group.consumer.out_features, expected):
        raise ValueError(f"{group.consumer_name}: new weight {tuple(consumer_weight.shape)}, expected "
                         f"{(group.consumer.out_features, expected)}")
    set_param(group.consumer, "weight", consumer_weight)
    _sync_features(group.consumer)
    group.units = keep.numel()


# ---------------------------------------------------------------------------------------------
def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Each decoder layer's widths, read from its Linears (families with channel groups) and its
    MoE block (the number of routed experts and their intermediate width, under the config's own
    fields; layers without a MoE block have none)."""
    layout = LAYOUTS.get(base_model_type(model.config))
    count_key = expert_count_key(model.config)
    _, layers = find_decoder_layers(model)
    widths = []
    for layer in layers:
        entry = {}
        absent = absent_blocks(layer)
        if layout is not None and "mlp" not in absent:
            entry[layout.mlp_width_key] = layer.get_submodule(layout.mlp_consumer).in_features
        if layout is not None and layout.attention is not None and "attention" not in absent:
            head_dim = head_dim_of(model.config)
            q, k, o = (layer.get_submodule(layout.attention[i]) for i in (0, 1, 3))
            query_rows, kv_rows = attention_rows(q, k, o)
            entry["num_attention_heads"] = query_rows // head_dim
            entry["num_key_value_heads"] = kv_rows // head_dim
        blocks = moe_blocks(layer, "") if count_key is not None else []
        if blocks:
            entry[count_key] = blocks[0].num_experts
        experts = expert_channel_modules(layer, "") if layout is None else []
        if experts:  # a MoE family: the experts' own width (narrower experts)
            entry[expert_width_key(model.config)] = experts[0].width
        if absent:
            entry["no_op"] = absent
        widths.append(entry)
    return widths


def _stock_config_accepts(config, values: dict) -> bool:
    data = config.to_dict()
    data.update(values)
    data.pop("layer_widths", None)
    stock_type = base_model_type(config)
    stock_class = type(config) if config.model_type == stock_type else type(config).__mro__[1]
    try:
        stock_class.from_dict(data)
    except Exception:  # noqa: BLE001 - any refusal means "no": transformers 5 validates through
        # huggingface_hub's strict dataclasses, whose errors are not ValueErrors (e.g. a hidden size
        # that is no longer a multiple of the pruned head count)
        return False
    return True


def _common_widths(widths: list[dict[str, int]]) -> dict[str, int] | None:
    """The values every layer that has a field agrees on, or None when some field differs."""
    common: dict[str, int] = {}
    for entry in widths:
        for key, value in entry.items():
            if common.setdefault(key, value) != value:
                return None
    return common


def describe_widths(model: nn.Module) -> bool:
    """Write the model's per-layer widths into its config; returns True if it is heterogeneous."""
    config = model.config
    widths = layer_widths(model)
    common = None if any("no_op" in entry for entry in widths) else _common_widths(widths)
    # channel-group families: an explicit head_dim (hidden_size / num_heads no longer gives it)
    explicit = {"head_dim": head_dim_of(config)} if base_model_type(config) in LAYOUTS else {}
    already_pruned_class = config.model_type.startswith("optimum_pruned_")
    if common is not None and not already_pruned_class and _stock_config_accepts(config, {**common, **explicit}):
        old = {key: getattr(config, key, None) for key in common}
        for key, value in {**common, **explicit}.items():
            setattr(config, key, value)
        _sync_modules(model, widths, heterogeneous=False, old=old)
        check_described(model)
        return False
    if base_model_type(config) not in PRUNED_CLASSES:
        raise PruningError(f"optimum-prune has no modelling class for {base_model_type(config)!r} models whose "
                           f"layers differ in width; prune every layer alike (no per-layer overrides).")
    config_class, model_class = PRUNED_CLASSES[base_model_type(config)]
    if not already_pruned_class:
        config.__class__ = config_class
        model.__class__ = model_class
    for key, value in explicit.items():
        setattr(config, key, value)
    config.layer_widths = [
        {k: v for k, v in w.items() if v != getattr(config, k, None)} for w in widths
    ]
    config.architectures = [model_class.__name__]
    _sync_modules(model, widths, heterogeneous=True)
    check_described(model)
    return True


def check_described(model: nn.Module) -> None:
    """Refuse a config that would rebuild some decoder layer with other shapes than the pruned
    one (a width the config derives from another, say): the saved folder would not load. Each
    layer is built from its config on the meta device and its parameter shapes compared."""
    config = model.config
    _, layers = find_decoder_layers(model)
    for index, layer in enumerate(layers):
        try:
            with torch.device("meta"):
                built = build_layer(type(layer), config, index)
        except TypeError:  # a layer class built another way: not checked
            return
        expected = {name: tuple(p.shape) for name, p in built.named_parameters()}
        actual = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        wrong = sorted(name for name in actual if expected.get(name) != actual[name])
        if wrong:
            raise PruningError(
                f"The pruned {base_model_type(config)} layer {index} cannot be described by its config: rebuilt from "
                f"it, {wrong[0]} would be {expected.get(wrong[0])} instead of {actual[wrong[0]]}; this family's "
                f"structured pruning is not supported for these modules, leave them out with ignore=[...]."
            )


_COUNTS = ("num_attention_heads", "num_key_value_heads")


def _sync_modules(model: nn.Module, widths: list[dict[str, int]], heterogeneous: bool, old=None) -> None:
    """Modules that copied a width when they were built (Phi-3's attention keeps
    ``num_key_value_heads`` and reads ``num_attention_heads`` from its config to split ``qkv_proj``)
    see their layer's new widths, as they would after a reload: each layer's modules get the layer's
    own config (`layer_config`) when the widths differ per layer. With one expert count for every
    layer, the model's own copy of it (for the router loss) follows too."""
    config = model.config
    count_key = expert_count_key(config)
    if not heterogeneous and count_key is not None and old and count_key in old:
        for module in model.modules():
            if getattr(module, "num_experts", None) == old[count_key]:
                module.num_experts = getattr(config, count_key)
    _, layers = find_decoder_layers(model)
    for index, layer in enumerate(layers):
        own = layer_config(config, index) if heterogeneous else config
        for module in layer.modules():
            if heterogeneous and getattr(module, "config", None) is config:
                module.config = own
            for key in _COUNTS:
                if key in widths[index] and isinstance(getattr(module, key, None), int):
                    setattr(module, key, widths[index][key])


def remove_blocks(model: nn.Module, blocks) -> None:
    """Leave out attention / MLP blocks of decoder layers: ``blocks`` holds ``(layer index, "attention" |
    "mlp")`` pairs. A layer that loses both is removed whole (`remove_layers`); the others keep the
    blocks left and say which are gone (``no_op`` in ``layer_widths``: the heterogeneous classes)."""
    family = base_model_type(model.config)
    if family not in BLOCK_MODULES:
        raise PruningError(f"{family} decoder layers cannot lose their attention or MLP block alone (supported: "
                           f"{', '.join(sorted(BLOCK_MODULES))}); remove whole layers instead.")
    _, layers = find_decoder_layers(model)
    gone: dict[int, set[str]] = {}
    for index, block in blocks:
        gone.setdefault(int(index), set()).add(block)
    for index, layer in enumerate(layers):
        gone.setdefault(index, set()).update(absent_blocks(layer))
    whole = sorted(i for i, kinds in gone.items() if kinds >= {"attention", "mlp"})
    remove_layers(model, whole)
    kept = [i for i in range(len(layers)) if i not in whole]
    _, layers = find_decoder_layers(model)
    for new_index, old_index in enumerate(kept):
        for block in sorted(gone[old_index] - set(absent_blocks(layers[new_index]))):
            drop_block(layers[new_index], family, block, new_index)
    describe_widths(model)


def remove_layers(model: nn.Module, drop) -> None:
    """Delete whole decoder layers (depth pruning) and renumber the rest for the KV cache."""
    prefix, layers = find_decoder_layers(model)
    drop = sorted({int(i) for i in drop})
    if any(i < 0 or i >= len(layers) for i in drop):
        raise PruningError(f"Layer indices {drop} out of range for {len(layers)} decoder layers.")
    if len(drop) >= len(layers):
        raise PruningError("Cannot remove every decoder layer; keep at least one.")
    kept = [i for i in range(len(layers)) if i not in drop]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], new_layers)
    config = model.config
    for key in ("layer_types", "layer_widths"):
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
