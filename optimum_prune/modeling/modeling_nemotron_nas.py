"""Llama-family causal LMs whose decoder layers each have their own width, in the Nemotron-NAS form.

NVIDIA's Nemotron-NAS models (``DeciLMForCausalLM``, ``model_type`` ``nemotron-nas``) describe every
decoder layer by one ``block_configs`` entry::

    {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 3},
     "ffn": {"no_op": false, "replace_with_linear": false, "intermediate_size": 1088, "ffn_mult": 2.0}}

- ``attention.n_heads_in_group``: query heads per KV head; the layer has
  ``num_attention_heads // n_heads_in_group`` KV heads and always ``num_attention_heads`` query heads;
- ``ffn.intermediate_size`` (exact) or ``ffn.ffn_mult`` (width ``round_up(int(2 * ffn_mult *
  hidden_size / 3), 256)``); when both are present ``ffn_mult`` wins, as in vLLM;
- ``no_op``: the block is absent (its norm too) and the residual stream passes through.

vLLM serves this form (``DeciLMForCausalLM``), and SGLang, TensorRT-LLM and MLX read it with
``ffn_mult`` widths. transformers has no ``nemotron-nas`` classes: these are the Llama classes with
one layer class that builds each layer from its block (Qwen2's q/k/v biases through
``qkv_bias``). ``block_configs`` entries are attribute objects (``config.block_configs[i].ffn.no_op``),
as the engines read them, and plain dicts in ``config.json``.

This file imports only torch and transformers: optimum-prune copies it next to the weights so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the model without
optimum-prune installed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width an ``ffn_mult`` stands for: ``int(2 * ffn_mult * hidden / 3)`` rounded up to 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // 256) * 256


def _namespace(entry) -> SimpleNamespace:
    if isinstance(entry, SimpleNamespace):
        return entry
    return SimpleNamespace(**dict(entry))


def as_block(entry) -> SimpleNamespace:
    """One ``block_configs`` entry (a dict, as in ``config.json``) as the attribute object engines read."""
    entry = vars(entry) if isinstance(entry, SimpleNamespace) else dict(entry)
    attention = {"no_op": False, "replace_with_linear": False, **vars(_namespace(entry.get("attention", {})))}
    ffn = {"no_op": False, "replace_with_linear": False, **vars(_namespace(entry.get("ffn", {})))}
    return SimpleNamespace(attention=SimpleNamespace(**attention), ffn=SimpleNamespace(**ffn))


def block_as_dict(block) -> dict:
    """The JSON form of a ``block_configs`` entry."""
    return {"attention": dict(vars(block.attention)), "ffn": dict(vars(block.ffn))}


class DeciLMConfig(LlamaConfig):
    """A `LlamaConfig` with one ``block_configs`` entry per decoder layer (and ``qkv_bias``: biases on
    q/k/v only, as in Qwen2)."""

    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        blocks = getattr(self, "block_configs", None)
        if blocks is None:
            blocks = [{"attention": {"n_heads_in_group": self.num_attention_heads // self.num_key_value_heads},
                       "ffn": {"intermediate_size": self.intermediate_size}}] * self.num_hidden_layers
        self.block_configs = [as_block(block) for block in blocks]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [block_as_dict(as_block(block)) for block in self.block_configs]
        return out


def layer_config(config, index: int):
    """A copy of ``config`` with the widths of decoder layer ``index`` (``num_key_value_heads``,
    ``intermediate_size``) taken from its block."""
    block = config.block_configs[index]
    sub = copy.copy(config)
    if not block.attention.no_op:
        sub.num_key_value_heads = config.num_attention_heads // block.attention.n_heads_in_group
    if not block.ffn.no_op:
        ffn_mult = getattr(block.ffn, "ffn_mult", None)
        sub.intermediate_size = (ffn_mult_to_intermediate_size(ffn_mult, config.hidden_size) if ffn_mult is not None
                                 else block.ffn.intermediate_size)
    return sub


class DeciLMDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer built from its own block: its KV heads and MLP width, q/k/v biases with
    ``qkv_bias``, and no attention (or no MLP) block, norm included, where the block is ``no_op``."""

    def __init__(self, config, layer_idx: int):
        own = layer_config(config, layer_idx)
        super().__init__(own, layer_idx)
        self.layer_idx = layer_idx
        block = config.block_configs[layer_idx]
        if getattr(config, "qkv_bias", False) and not config.attention_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(self.self_attn, name)
                setattr(self.self_attn, name, nn.Linear(old.in_features, old.out_features, bias=True))
        if block.attention.no_op:
            self.self_attn = self.input_layernorm = None
        if block.ffn.no_op:
            self.mlp = self.post_attention_layernorm = None

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attention
        else:
            self._record_length(hidden_states, kwargs)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states

    def _record_length(self, hidden_states: torch.Tensor, kwargs) -> None:
        """A layer without attention still tells the KV cache how many tokens it has seen (one
        zero-width head), so that the cache's length is right whichever layer it is asked of."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and kwargs.get("use_cache", True):
            empty = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)


class DeciLMForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` whose decoder layers are built from ``config.block_configs``."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        layers = self.model.layers
        if len(config.block_configs) != len(layers):
            raise ValueError(f"block_configs has {len(config.block_configs)} entries for {len(layers)} decoder layers")
        for index in range(len(layers)):
            layers[index] = DeciLMDecoderLayer(config, index)
        self.post_init()


# save_pretrained copies this file next to the weights and writes the config's auto_map
DeciLMConfig.register_for_auto_class()
DeciLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
