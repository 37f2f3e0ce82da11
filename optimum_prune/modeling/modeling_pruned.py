"""Causal LMs whose decoder layers each have their own width, as written by optimum-prune.

A structured prune that removes a different number of MLP channels or attention heads in every
layer cannot be described by a stock config (one ``intermediate_size``, one head count). These
classes are the stock LLaMA / Mistral / Qwen2 / Qwen3 / Gemma-2 / Gemma-3 / Phi-3 / OPT / GPT-NeoX classes (and, for
MoE models whose layers keep different numbers of experts, Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE /
DeepSeek-V3 / gpt-oss) plus one config entry, ``layer_widths``: a list with, for every decoder
layer, the values that differ from the global config (``intermediate_size`` or ``ffn_dim``,
``num_attention_heads``, ``num_key_value_heads``, the number of routed experts, the experts' width
``moe_intermediate_size`` / ``intermediate_size``) and ``no_op``: the blocks (``"attention"``,
``"mlp"``) the layer does not have (depth pruning at block granularity; the residual stream passes
through, the block's norms are gone with it).
Each layer is built from a copy of the config with its own widths; everything else (attention
kernels, KV cache, generation) is the stock code.

This file imports only torch and transformers: it is saved next to the weights so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the model without
optimum-prune installed. With optimum-prune imported, the classes are registered with the Auto
classes and ``trust_remote_code`` is not needed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
)


#: The per-layer entries ``layer_widths`` may set.
LAYER_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "num_attention_heads", "num_key_value_heads",
                    "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "no_op")

_LLAMA_BLOCKS = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
#: Per family, the modules of a decoder layer's attention block and MLP block, the block itself
#: first, then the norms that feed or follow it (gone with the block: a ``no_op`` block).
BLOCK_MODULES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                     "deepseek_v3", "gpt_oss"), _LLAMA_BLOCKS),
    **dict.fromkeys(("gemma2", "gemma3_text"), {
        "attention": ("self_attn", "input_layernorm", "post_attention_layernorm"),
        "mlp": ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")}),
    "gpt_neox": {"attention": ("attention", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")},
}


class AbsentAttention(nn.Module):
    """An attention block that is not there: it adds nothing to the residual stream. It still tells
    the KV cache how many tokens it has seen (one zero head), so that the cache's length is right
    whichever layer it is asked of."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[key] for key in ("cache", "past_key_values", "layer_past") if kwargs.get(key) is not None),
                     None)
        if cache is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


#: families whose MLP block returns (hidden states, router scores)
_MLP_WITH_SCORES = ("gpt_oss",)


class AbsentMLP(nn.Module):
    """An MLP block that is not there: it adds nothing to the residual stream."""

    def __init__(self, with_scores: bool = False):
        super().__init__()
        self.with_scores = with_scores

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.with_scores else zeros


def _family(config) -> str:
    model_type = config.model_type
    return model_type[len("optimum_pruned_"):] if model_type.startswith("optimum_pruned_") else model_type


def drop_block(layer: nn.Module, family: str, block: str, layer_idx: int) -> None:
    """Make ``block`` (``"attention"`` or ``"mlp"``) of decoder ``layer`` absent, its norms too."""
    modules = BLOCK_MODULES.get(family, {}).get(block)
    if modules is None:
        raise ValueError(f"no {block} block of {family} decoder layers can be left out; "
                         f"supported: {sorted(BLOCK_MODULES)} (attention, mlp)")
    main, *norms = modules
    setattr(layer, main, AbsentAttention(layer_idx) if block == "attention" else AbsentMLP(family in _MLP_WITH_SCORES))
    for name in norms:
        setattr(layer, name, nn.Identity())


def absent_blocks(layer: nn.Module) -> list[str]:
    """The blocks of decoder ``layer`` that are absent (``no_op``), in the order attention, MLP."""
    kinds = {AbsentAttention: "attention", AbsentMLP: "mlp"}
    found = {kinds[type(module)] for module in layer.children() if type(module) in kinds}
    return [block for block in ("attention", "mlp") if block in found]


def build_layer(layer_cls, config, index: int) -> nn.Module:
    """Decoder layer ``index`` of a heterogeneous model: built from its own config, its ``no_op``
    blocks absent."""
    own = layer_config(config, index)
    layer = layer_cls(own, index)
    for block in getattr(own, "no_op", None) or ():
        drop_block(layer, _family(config), block, index)
    return layer


def layer_config(config, index: int):
    """A copy of ``config`` with the widths of decoder layer ``index``."""
    widths = (getattr(config, "layer_widths", None) or [{}] * (index + 1))[index]
    unknown = set(widths) - set(LAYER_WIDTH_KEYS)
    if unknown:
        raise ValueError(f"layer_widths[{index}] has unknown entries {sorted(unknown)}; allowed: {LAYER_WIDTH_KEYS}")
    sub = copy.copy(config)
    sub.__dict__.update(widths)
    return sub


class _HeterogeneousLayers:
    """Mixin: rebuilds every decoder layer from its own copy of the config."""

    def _build_heterogeneous_layers(self):
        layers = self.get_decoder().layers
        widths = getattr(self.config, "layer_widths", None)
        if widths is None:
            return
        if len(widths) != len(layers):
            raise ValueError(f"layer_widths has {len(widths)} entries for {len(layers)} decoder layers")
        layer_cls = type(layers[0])
        for index in range(len(layers)):
            if widths[index]:
                layers[index] = build_layer(layer_cls, self.config, index)
        self.post_init()


def _pruned_config(base, model_type: str):
    class Config(base):
        pass

    Config.model_type = model_type
    Config.__name__ = Config.__qualname__ = "Pruned" + base.__name__
    return Config


def _pruned_model(base, config_class):
    class Model(_HeterogeneousLayers, base):
        def __init__(self, config):
            super().__init__(config)
            self._build_heterogeneous_layers()

    Model.config_class = config_class
    Model.__name__ = Model.__qualname__ = "Pruned" + base.__name__
    return Model


PrunedLlamaConfig = _pruned_config(LlamaConfig, "optimum_pruned_llama")
PrunedMistralConfig = _pruned_config(MistralConfig, "optimum_pruned_mistral")
PrunedQwen2Config = _pruned_config(Qwen2Config, "optimum_pruned_qwen2")
PrunedQwen3Config = _pruned_config(Qwen3Config, "optimum_pruned_qwen3")
PrunedOPTConfig = _pruned_config(OPTConfig, "optimum_pruned_opt")
PrunedGemma2Config = _pruned_config(Gemma2Config, "optimum_pruned_gemma2")
PrunedGemma3TextConfig = _pruned_config(Gemma3TextConfig, "optimum_pruned_gemma3_text")
PrunedPhi3Config = _pruned_config(Phi3Config, "optimum_pruned_phi3")

PrunedGPTNeoXConfig = _pruned_config(GPTNeoXConfig, "optimum_pruned_gpt_neox")
PrunedMixtralConfig = _pruned_config(MixtralConfig, "optimum_pruned_mixtral")
PrunedQwen2MoeConfig = _pruned_config(Qwen2MoeConfig, "optimum_pruned_qwen2_moe")
PrunedQwen3MoeConfig = _pruned_config(Qwen3MoeConfig, "optimum_pruned_qwen3_moe")
PrunedOlmoeConfig = _pruned_config(OlmoeConfig, "optimum_pruned_olmoe")
PrunedDeepseekV3Config = _pruned_config(DeepseekV3Config, "optimum_pruned_deepseek_v3")
PrunedGptOssConfig = _pruned_config(GptOssConfig, "optimum_pruned_gpt_oss")

PrunedLlamaForCausalLM = _pruned_model(LlamaForCausalLM, PrunedLlamaConfig)
PrunedMistralForCausalLM = _pruned_model(MistralForCausalLM, PrunedMistralConfig)
PrunedQwen2ForCausalLM = _pruned_model(Qwen2ForCausalLM, PrunedQwen2Config)
PrunedQwen3ForCausalLM = _pruned_model(Qwen3ForCausalLM, PrunedQwen3Config)
PrunedOPTForCausalLM = _pruned_model(OPTForCausalLM, PrunedOPTConfig)
PrunedGemma2ForCausalLM = _pruned_model(Gemma2ForCausalLM, PrunedGemma2Config)
PrunedGemma3ForCausalLM = _pruned_model(Gemma3ForCausalLM, PrunedGemma3TextConfig)
PrunedPhi3ForCausalLM = _pruned_model(Phi3ForCausalLM, PrunedPhi3Config)
PrunedGPTNeoXForCausalLM = _pruned_model(GPTNeoXForCausalLM, PrunedGPTNeoXConfig)
PrunedMixtralForCausalLM = _pruned_model(MixtralForCausalLM, PrunedMixtralConfig)
PrunedQwen2MoeForCausalLM = _pruned_model(Qwen2MoeForCausalLM, PrunedQwen2MoeConfig)
PrunedQwen3MoeForCausalLM = _pruned_model(Qwen3MoeForCausalLM, PrunedQwen3MoeConfig)
PrunedOlmoeForCausalLM = _pruned_model(OlmoeForCausalLM, PrunedOlmoeConfig)
PrunedDeepseekV3ForCausalLM = _pruned_model(DeepseekV3ForCausalLM, PrunedDeepseekV3Config)
PrunedGptOssForCausalLM = _pruned_model(GptOssForCausalLM, PrunedGptOssConfig)

#: stock model_type -> (config class, model class)
PRUNED_CLASSES = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "opt": (PrunedOPTConfig, PrunedOPTForCausalLM),
    "gemma2": (PrunedGemma2Config, PrunedGemma2ForCausalLM),
    "gemma3_text": (PrunedGemma3TextConfig, PrunedGemma3ForCausalLM),
    "phi3": (PrunedPhi3Config, PrunedPhi3ForCausalLM),
    "gpt_neox": (PrunedGPTNeoXConfig, PrunedGPTNeoXForCausalLM),
    "mixtral": (PrunedMixtralConfig, PrunedMixtralForCausalLM),
    "qwen2_moe": (PrunedQwen2MoeConfig, PrunedQwen2MoeForCausalLM),
    "qwen3_moe": (PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM),
    "olmoe": (PrunedOlmoeConfig, PrunedOlmoeForCausalLM),
    "deepseek_v3": (PrunedDeepseekV3Config, PrunedDeepseekV3ForCausalLM),
    "gpt_oss": (PrunedGptOssConfig, PrunedGptOssForCausalLM),
}

for _config_class, _model_class in PRUNED_CLASSES.values():
    # save_pretrained copies this file next to the weights and writes the config's auto_map
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForCausalLM")
