"""Tiny random models of the architecture families optimum-prune covers, built from the
transformers config classes, and the supported-architectures table of docs/architectures.md.

The table is derived from these models (which tensors a prune targets, whether the structured
groups of the family are known) and checked by tests/test_architectures.py, which also prunes every
family; regenerate the page after a change with ``python tests/families.py``.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "architectures.md")

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, intermediate_size=128),
    "mistral": lambda: transformers.MistralConfig(**SMALL, intermediate_size=128),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, intermediate_size=128),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, intermediate_size=128, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, intermediate_size=128, head_dim=16),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, intermediate_size=128, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**SMALL, intermediate_size=128, pad_token_id=0),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   max_position_embeddings=256),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=128, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=64,
                                                     shared_expert_intermediate_size=64, num_experts=4,
                                                     num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=64,
                                                     num_experts=4, num_experts_per_tok=2, head_dim=16),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, intermediate_size=64, num_local_experts=4,
                                                 num_experts_per_tok=2, head_dim=16),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **SMALL, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=64, num_experts=4, num_experts_per_tok=2),
}

#: Families whose experts are stored in a form the engine cannot prune yet (left dense and reported).
UNSUPPORTED_EXPERTS = {
    "llama4_text": (lambda: transformers.Llama4TextConfig(**SMALL, head_dim=16, intermediate_size=64,
                                                          intermediate_size_mlp=128, num_local_experts=4,
                                                          num_experts_per_tok=1, interleave_moe_layer_step=1),
                    "every expert runs on every token in one batched product (no per-expert slice to calibrate)"),
}


def fully_covered(report) -> bool:
    """Every matrix of the decoder layers is either pruned or a router left out on purpose, and
    the report accounts for each one (nothing unhandled, nothing ignored)."""
    return (not report.unhandled and not report.ignored
            and report.covered_weights + sum(report.routers.values()) == report.layer_weights)


def build(family: str, seed: int = 0):
    factory = FAMILIES[family] if family in FAMILIES else UNSUPPORTED_EXPERTS[family][0]
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(factory()).eval()


def support_row(family: str) -> dict[str, str]:
    """What optimum-prune does with ``family``, read off its tiny model."""
    from optimum_prune.errors import PruningError
    from optimum_prune.structure.experts import expert_banks, is_fused_experts
    from optimum_prune.structure.groups import layer_groups
    from optimum_prune.structure.layers import find_decoder_layers
    from optimum_prune.structure.moe import moe_blocks

    model = build(family)
    prefix, layers = find_decoder_layers(model)
    try:
        layer_groups(model, layers[0], f"{prefix}.0", 0)
        structured = "yes"
    except PruningError:
        structured = ("experts: narrower (channel methods) or whole (`expert-drop`)"
                      if moe_blocks(layers[0], f"{prefix}.0") else "no")
    banks = [b for i, layer in enumerate(layers) for b in expert_banks(layer, f"{prefix}.{i}", None, []).values()]
    if banks:
        experts = f"yes ({banks[0].family}{', transposed' if banks[0].transposed else ''})"
    elif any(p.dim() == 3 for p in layers[0].parameters()) and not any(map(is_fused_experts, layers[0].modules())):
        experts = "no: " + UNSUPPORTED_EXPERTS[family][1]
    else:
        experts = "dense model"
    calibrated = "yes" if family in FAMILIES else "yes (attention and shared Linears; experts left dense)"
    return {"family": family, "unstructured": calibrated, "n:m": calibrated, "structured": structured,
            "experts": experts}


def support_table() -> str:
    rows = [support_row(family) for family in [*FAMILIES, *UNSUPPORTED_EXPERTS]]
    lines = ["| family (`model_type`) | unstructured | N:M (2:4) | structured | MoE experts |", "|---|---|---|---|---|"]
    lines += [f"| `{r['family']}` | {r['unstructured']} | {r['n:m']} | {r['structured']} | {r['experts']} |" for r in rows]
    return "\n".join(lines)


BEGIN, END = "<!-- table: generated by tests/families.py -->", "<!-- end of table -->"


def write_docs() -> None:
    text = open(DOCS).read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(DOCS, "w") as handle:
        handle.write(f"{head}{BEGIN}\n{support_table()}\n{END}{tail}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    write_docs()
