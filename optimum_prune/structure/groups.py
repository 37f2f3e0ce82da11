"""Which rows and columns must go together when a decoder layer is made narrower.

A *channel group* is one intermediate dimension of a decoder layer: the rows that *produce* it
(gate_proj and up_proj for a LLaMA MLP, fc1 and its bias for OPT, q/k/v for attention) and the
columns of the Linear that *consumes* it (down_proj, fc2, o_proj). Removing unit ``j`` removes its
rows from every producer and its columns from the consumer, so the layer computes exactly what it
computed before minus that unit's contribution.

Units:

- MLP: one intermediate channel (1 row of each producer, 1 consumer column).
- Attention: one key/value group, i.e. one KV head together with the query heads that share it
  (``num_attention_heads / num_key_value_heads`` query heads). Removing whole KV groups keeps the
  ratio of query to KV heads, which is what the stock attention code assumes, so a uniformly
  pruned model still loads as a stock model. Without grouped-query attention a unit is one head.
  Each layer keeps at least one unit of every group.

Fused Linears (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are several producers of one Linear,
each owning consecutive rows from its ``offset`` on (queries, keys, values; gates, ups): a unit is
then a set of row slices, one in each.

Value/output channels alone (FASP's pairing for OPT) would give values a different head size from
queries and keys, which neither the stock classes nor ours express; they are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningError
from ..modeling import absent_blocks
from .layers import names_selected


@dataclass
class Producer:
    name: str  # full module name
    linear: nn.Linear
    rows_per_unit: int
    offset: int = 0  # first row of this producer's slice when several producers share one fused Linear

    def rows(self, units: int) -> slice:
        """This producer's rows of its Linear when the group has ``units`` units."""
        return slice(self.offset, self.offset + units * self.rows_per_unit)


def assign_offsets(producers: list[Producer], units: int) -> None:
    """Producers of one fused Linear own consecutive slices, in the order listed."""
    ends: dict[int, int] = {}
    for producer in producers:
        producer.offset = ends.get(id(producer.linear), 0)
        ends[id(producer.linear)] = producer.offset + units * producer.rows_per_unit


@dataclass
class ChannelGroup:
    """One prunable intermediate dimension of one decoder layer."""

    kind: str  # "mlp" | "attention"
    name: str  # e.g. "model.layers.3.mlp"
    layer_index: int
    producers: list[Producer]
    consumer_name: str
    consumer: nn.Linear
    cols_per_unit: int
    units: int

    @property
    def params_per_unit(self) -> int:
        count = self.consumer.out_features * self.cols_per_unit
        for producer in self.producers:
            count += producer.rows_per_unit * (producer.linear.in_features + (producer.linear.bias is not None))
        return count

    @property
    def params(self) -> int:
        return self.params_per_unit * self.units

    @property
    def member_names(self) -> list[str]:
        return [p.name for p in self.producers] + [self.consumer_name]


@dataclass(frozen=True)
class Layout:
    """Module names of one architecture's decoder layer, relative to the layer."""

    attention: tuple[str, str, str, str] | None  # q, k, v, o
    mlp_producers: tuple[str, ...]
    mlp_consumer: str = "mlp.down_proj"
    mlp_width_key: str = "intermediate_size"  # config field of the MLP width
    attention_name: str = "self_attn"
    mlp_name: str = "mlp"


_LLAMA = Layout(
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_producers=("mlp.gate_proj", "mlp.up_proj"),
)
# OPT derives its head size from hidden_size / num_heads, so fewer heads cannot be expressed:
# only the MLP (fc1 -> fc2, named "<layer>.mlp" like everywhere else) is made narrower.
_OPT = Layout(attention=None, mlp_producers=("fc1",), mlp_consumer="fc2", mlp_width_key="ffn_dim")
# GPT-NeoX (Pythia) derives its head size from hidden_size / num_attention_heads like OPT, and
# interleaves q/k/v per head in query_key_value: only the MLP is made narrower.
_GPT_NEOX = Layout(attention=None, mlp_producers=("mlp.dense_h_to_4h",), mlp_consumer="mlp.dense_4h_to_h")
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the same Linear named for each
# producer, sliced by offsets (see `assign_offsets`).
_PHI3 = Layout(
    attention=("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
    mlp_producers=("mlp.gate_up_proj", "mlp.gate_up_proj"),
)
# Gemma-2/3 share LLaMA's module names; their q/k norms act on one head (head_dim, unchanged),
# head_dim is explicit and attention scaling comes from query_pre_attn_scalar, so removing KV
# groups or MLP channels needs nothing more.
LAYOUTS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma2": _LLAMA,
           "gemma3_text": _LLAMA, "phi3": _PHI3, "opt": _OPT, "gpt_neox": _GPT_NEOX}


def base_model_type(config) -> str:
    model_type = getattr(config, "model_type", "")
    return model_type[len("optimum_pruned_"):] if model_type.startswith("optimum_pruned_") else model_type


def has_layout(model: nn.Module) -> bool:
    """Whether the channel groups of ``model``'s family are known."""
    config = getattr(model, "config", None)
    return config is not None and base_model_type(config) in LAYOUTS


def layout_for(model: nn.Module) -> Layout:
    config = getattr(model, "config", None)
    model_type = base_model_type(config) if config is not None else ""
    if model_type not in LAYOUTS:
        raise PruningError(
            f"Structured pruning cannot shrink architecture {model_type or type(model).__name__!r}; supported: "
            f"{', '.join(sorted(LAYOUTS))} (and the experts of fused MoE models, with a layer-wise method). Use an "
            f"unstructured or N:M pattern for this model."
        )
    return LAYOUTS[model_type]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_groups(model: nn.Module, layer: nn.Module, layer_name: str, index: int) -> list[ChannelGroup]:
    """The channel groups of one decoder layer (attention first, then MLP); a block left out (``no_op``)
    has none."""
    layout = layout_for(model)
    groups = []
    absent = absent_blocks(layer)
    if layout.attention is not None and "attention" not in absent:
        q, k, v, o = (layer.get_submodule(n) for n in layout.attention)
        head_dim = head_dim_of(model.config)
        query_rows, kv_rows = attention_rows(q, k, o)
        kv_heads = kv_rows // head_dim
        rep = query_rows // kv_rows
        producers = [
            Producer(f"{layer_name}.{layout.attention[0]}", q, rep * head_dim),
            Producer(f"{layer_name}.{layout.attention[1]}", k, head_dim),
            Producer(f"{layer_name}.{layout.attention[2]}", v, head_dim),
        ]
        groups.append(_group("attention", f"{layer_name}.{layout.attention_name}", index, producers,
                             f"{layer_name}.{layout.attention[3]}", o, rep * head_dim, kv_heads))
    if "mlp" in absent:
        return groups
    producers = [Producer(f"{layer_name}.{n}", layer.get_submodule(n), 1) for n in layout.mlp_producers]
    consumer = layer.get_submodule(layout.mlp_consumer)
    groups.append(_group("mlp", f"{layer_name}.{layout.mlp_name}", index, producers,
                         f"{layer_name}.{layout.mlp_consumer}", consumer, 1, consumer.in_features))
    return groups


def gated_mlp_group(name: str, index: int, mlp: nn.Module) -> ChannelGroup:
    """The channel group of a gated MLP module ``mlp`` (full name ``name``) with ``gate_proj``,
    ``up_proj`` and ``down_proj`` Linears (e.g. a MoE block's shared experts)."""
    producers = [Producer(f"{name}.gate_proj", mlp.gate_proj, 1), Producer(f"{name}.up_proj", mlp.up_proj, 1)]
    return _group("mlp", name, index, producers, f"{name}.down_proj", mlp.down_proj, 1, mlp.down_proj.in_features)


def _group(kind: str, name: str, index: int, producers: list[Producer], consumer_name: str, consumer: nn.Linear,
           cols_per_unit: int, units: int) -> ChannelGroup:
    assign_offsets(producers, units)
    return ChannelGroup(kind=kind, name=name, layer_index=index, producers=producers, consumer_name=consumer_name,
                        consumer=consumer, cols_per_unit=cols_per_unit, units=units)


def attention_rows(q: nn.Linear, k: nn.Linear, o: nn.Linear) -> tuple[int, int]:
    """(query rows, key rows) of an attention block: the output projection reads the query heads;
    a fused q/k/v Linear holds the keys and values, equally many, after them."""
    query_rows = o.in_features
    return query_rows, ((q.out_features - query_rows) // 2 if k is q else k.out_features)


def group_selected(group: ChannelGroup, targets, ignore) -> bool:
    """Whether ``targets`` / ``ignore`` (patterns on module names) select a group: they may name
    the group (``*.self_attn``, ``model.layers.3.mlp``) or any of its Linears."""
    return names_selected([group.name, *group.member_names], targets, ignore)


def unit_indices(keep: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Row (or column) indices of the kept units, ``per_unit`` consecutive ones per unit."""
    keep = keep.to(torch.long)
    return (keep[:, None] * per_unit + torch.arange(per_unit, device=keep.device)).reshape(-1)
