"""GGUF files for llama.cpp / Ollama / LM Studio, written from a saved output folder with ``gguf``.

- Stock Llama and Mistral folders become llama.cpp's ``llama`` architecture, stock Qwen2 its ``qwen2``;
- folders whose layers differ in width (``layer_widths``, or the Nemotron-NAS ``block_configs``)
  become ``deci``, llama.cpp's architecture with per-layer ``feed_forward_length``, ``head_count``
  and ``head_count_kv`` arrays (attention-free layers allowed).

Two corners of llama.cpp's ``deci`` support are worked around with blocks whose output is zero (the
same outputs, a few more weights): its graph skips the rest of a layer whose MLP width is 0,
attention output included, so a layer that keeps its attention but not its MLP gets a one-channel
MLP with a zero down projection; and it reads the head size only when layer 0 has attention, so an
attention-free layer 0 gets one head with a zero output projection.

The llama and deci graphs rotate query/key pairs (i, i + 1), Hugging Face's Llama code pairs (i,
i + head_dim / 2): q and k rows are permuted within every head, as llama.cpp's own converter does.
``q8_0`` quantises every 2-D weight whose rows are a multiple of 32 long; the others (an MLP width
that is not) stay f16. The tokenizer (byte-level BPE: GPT-2, SmolLM, Llama-3, Qwen2 style) and the
chat template go into the metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import PruningError
from ..fields import GGUF_TYPES
from ..modeling.modeling_nemotron_nas import ffn_mult_to_intermediate_size
from .families import active_window, family_of, is_heterogeneous, is_nemotron_nas, layer_widths_of

#: ``--gguf`` values: the weights' type in the file

#: families (``model_type`` after optimum-prune's prefix) the exporter reads
GGUF_FAMILIES = ("llama", "mistral", "qwen2")

@dataclass
class LayerShape:
    """What one decoder layer holds: query and KV heads (0: no attention block), MLP width (0: none)."""

    heads: int
    kv_heads: int
    ffn: int


@dataclass
class GGUFLayout:
    """What the exporter needs of a folder's ``config.json``."""

    arch: str  # the llama.cpp architecture written
    layers: list[LayerShape]
    hidden: int
    head_dim: int


def check_gguf_type(value: str, name: str = "gguf") -> None:
    """One line naming the types when ``value`` is not a GGUF type the export writes."""
    if value not in GGUF_TYPES:
        raise PruningError(f"{name} must be one of {', '.join(GGUF_TYPES)}, got {value!r}.")


def gguf_refusal(config: dict) -> str | None:
    """Why llama.cpp cannot run the model ``config`` (a ``config.json`` dict) describes, or None.

    Checked on the base model before a prune (``--gguf``) and on the saved folder before export."""
    family = family_of(config)
    if family not in GGUF_FAMILIES:
        return (f"GGUF export covers {', '.join(GGUF_FAMILIES)} models (and their pruned forms), not "
                f"{config.get('model_type')!r}; save without --gguf and use the engines docs/deploy.md lists for it")
    window = active_window(config)
    if window is not None:
        return (f"the model attends over a sliding window of {window} tokens, which llama.cpp's {family} graph "
                f"does not apply; GGUF export would change its outputs")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        return f"rope type {rope_type!r} is not written by the GGUF export (default, linear, llama3)"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r}: llama.cpp's {family} graph uses silu"
    if config.get("mlp_bias") or (config.get("attention_bias") and family != "qwen2"):
        return "biases on the output or MLP projections are not written by the GGUF export"
    return None


def read_layout(config: dict) -> GGUFLayout:
    """The per-layer shapes of a saved folder's ``config.json`` (stock, ``layer_widths`` or ``block_configs``)."""
    family = family_of(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if is_nemotron_nas(config):
        layers = []
        for block in config["block_configs"]:
            attention, mlp = block["attention"], block["ffn"]
            if mlp.get("no_op"):
                width = 0
            elif mlp.get("ffn_mult") is not None:
                width = ffn_mult_to_intermediate_size(mlp["ffn_mult"], hidden)
            else:
                width = mlp["intermediate_size"]
            attention_heads = 0 if attention.get("no_op") else heads
            layers.append(LayerShape(attention_heads, attention_heads and heads // attention["n_heads_in_group"], width))
    else:
        layers = [LayerShape(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"])
                  for w in layer_widths_of(config)]
    uniform = all(layer == layers[0] for layer in layers)
    if not uniform or is_heterogeneous(config):
        arch = "deci"
    else:
        arch = "qwen2" if family == "qwen2" else "llama"
    return GGUFLayout(arch, layers, hidden, head_dim)


# ---------------------------------------------------------------------------------------------
# tokenizer

_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN2_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer from ``tokenizer.json``, or None."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _tokenizer(folder: str, vocab_size: int, pre_tokenizer: str | None):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise PruningError(f"Cannot export GGUF: {folder} has no tokenizer.json; save the tokenizer with the model.")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    model = data.get("model", {})
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise PruningError(f"Cannot export GGUF: the tokenizer is {model.get('type')} with a {decoder.get('type')} "
                           f"decoder; the export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3, Qwen2).")
    pre = pre_tokenizer or _pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise PruningError("Cannot export GGUF: the tokenizer's pre-tokenizer is not one the export recognises; "
                           "name llama.cpp's for it with export_gguf(..., pre_tokenizer='llama-bpe' | 'qwen2' | ...).")
    tokens: dict[int, tuple[str, int]] = {i: (t, 1) for t, i in model["vocab"].items()}  # 1: normal
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], 3 if added.get("special") else 4)  # 3: control, 4: user-defined
    size = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, (f"[PAD{i}]", 5))[0] for i in range(size)]  # 5: unused
    types = [tokens.get(i, ("", 5))[1] for i in range(size)]
    return pre, names, types


# ---------------------------------------------------------------------------------------------
# weights

def _read_weights(folder: str) -> dict:
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise PruningError(f"Cannot export GGUF: {folder} holds no safetensors weights; save it with save_pretrained.")
    weights = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            for key in handle.keys():
                weights[key] = handle.get_tensor(key).float().numpy()
    return weights


def _rope_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection reordered from Hugging Face's rotate-half pairing to llama.cpp's
    adjacent pairs, within each head."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_tensors(weights: dict, layout: GGUFLayout):
    """(gguf name, float32 array) in llama.cpp's order and layout."""
    yield "token_embd.weight", weights["model.embed_tokens.weight"]
    yield "output_norm.weight", weights["model.norm.weight"]
    if "lm_head.weight" in weights:
        yield "output.weight", weights["lm_head.weight"]
    permute = layout.arch != "qwen2"
    for index, shape in enumerate(layout.layers):
        prefix = f"model.layers.{index}."
        for hf, name in _NAMES.items():
            for suffix in ("",) if hf.endswith(".weight") else (".weight", ".bias"):
                key = prefix + hf + suffix
                if key not in weights:
                    continue
                value = weights[key]
                if permute and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    value = _rope_pairs(value, shape.heads if hf == "self_attn.q_proj" else shape.kv_heads)
                yield f"blk.{index}.{name}{suffix}", value
        yield from _stub_blocks(index, shape, layout)


def stub_shape(index: int, shape: LayerShape, layout: GGUFLayout) -> LayerShape:
    """The shape llama.cpp is told for a layer: its own, or with the zero-output stub blocks of the
    module docstring."""
    if layout.arch != "deci":
        return shape
    heads, kv_heads = (1, 1) if index == 0 and not shape.heads else (shape.heads, shape.kv_heads)
    return LayerShape(heads, kv_heads, shape.ffn or (1 if heads else 0))


def _stub_blocks(index: int, shape: LayerShape, layout: GGUFLayout):
    written, hidden, zeros = stub_shape(index, shape, layout), layout.hidden, np.zeros
    if written.heads and not shape.heads:
        yield f"blk.{index}.attn_norm.weight", np.ones(hidden, dtype=np.float32)
        for name in ("attn_q", "attn_k", "attn_v"):
            yield f"blk.{index}.{name}.weight", zeros((layout.head_dim, hidden), dtype=np.float32)
        yield f"blk.{index}.attn_output.weight", zeros((hidden, layout.head_dim), dtype=np.float32)
    if written.ffn and not shape.ffn:
        yield f"blk.{index}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)
        yield f"blk.{index}.ffn_gate.weight", zeros((1, hidden), dtype=np.float32)
        yield f"blk.{index}.ffn_up.weight", zeros((1, hidden), dtype=np.float32)
        yield f"blk.{index}.ffn_down.weight", zeros((hidden, 1), dtype=np.float32)


def _encode(value: np.ndarray, kind: str):
    """(data, raw dtype or None) of one tensor in the file's type; 1-D tensors stay float32."""
    import gguf

    if value.ndim < 2 or kind == "f32":
        return value.astype(np.float32), None
    if kind == "q8_0" and value.shape[-1] % 32 == 0:
        return gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(value, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return value.astype(np.float16), None


def _rope_metadata(writer, config: dict, layout: GGUFLayout):
    """Rope base, and scaling: linear as metadata, Llama-3's as the ``rope_freqs`` tensor."""
    import gguf

    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope_type != "llama3":
        return None
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    stock = LlamaConfig(hidden_size=layout.hidden, num_attention_heads=config["num_attention_heads"],
                        head_dim=layout.head_dim, max_position_embeddings=config.get("max_position_embeddings", 2048),
                        rope_parameters={**rope, "rope_theta": theta})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](stock, torch.device("cpu"))
    base = 1.0 / (theta ** (torch.arange(0, layout.head_dim, 2, dtype=torch.float64) / layout.head_dim))
    return (base / scaled.double()).float().numpy()  # llama.cpp divides each frequency by its factor


def export_gguf(folder: str | os.PathLike, path: str | os.PathLike | None = None, dtype: str = "f16",
                pre_tokenizer: str | None = None, arch: str | None = None) -> str:
    """Write the model saved in ``folder`` as one GGUF file and return its path.

    ``path`` defaults to ``<folder>/<folder name>-<dtype>.gguf``; ``dtype``: ``f32``, ``f16``,
    ``bf16`` or ``q8_0`` (see the module docstring). ``pre_tokenizer`` names llama.cpp's
    pre-tokenizer when the tokenizer's is not recognised. ``arch="deci"`` writes a uniform model in
    the per-layer architecture too (to compare llama.cpp's two graphs on the same weights). The file
    is written beside its final name and renamed into place: a failed export leaves nothing behind.
    """
    import gguf

    check_gguf_type(dtype, "GGUF type")
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise PruningError(f"Cannot export GGUF: {folder} has no config.json; give a folder save_pretrained wrote.")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    refusal = gguf_refusal(config)
    if refusal:
        raise PruningError(f"Cannot export GGUF: {refusal}.")
    layout = read_layout(config)
    if arch is not None:
        if arch != "deci":
            raise PruningError(f"arch may only force 'deci' (the per-layer architecture), got {arch!r}.")
        layout.arch = arch
    pre, tokens, token_types = _tokenizer(folder, config["vocab_size"], pre_tokenizer)
    weights = _read_weights(folder)
    name = os.path.basename(os.path.abspath(folder))
    path = os.fspath(path) if path is not None else os.path.join(folder, f"{name}-{dtype}.gguf")
    partial = path + ".partial"
    writer = gguf.GGUFWriter(partial, layout.arch)
    try:
        _write(writer, config, layout, weights, dtype, name, folder, pre, tokens, token_types)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return path


def _write(writer, config, layout, weights, dtype, name, folder, pre, tokens, token_types):
    import gguf

    layers = [stub_shape(index, shape, layout) for index, shape in enumerate(layout.layers)]
    uniform = layout.arch != "deci"
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(layers[0].ffn if uniform else [layer.ffn for layer in layers])
    writer.add_head_count(layers[0].heads if uniform else [layer.heads for layer in layers])
    writer.add_head_count_kv(layers[0].kv_heads if uniform else [layer.kv_heads for layer in layers])
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(len(tokens))
    rope_freqs = _rope_metadata(writer, config, layout)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for tensor_name, value in _gguf_tensors(weights, layout):
        if tensor_name == "token_embd.weight" and value.shape[0] < len(tokens):  # pad to the token list
            value = np.concatenate([value, np.zeros((len(tokens) - value.shape[0], value.shape[1]), np.float32)])
        data, raw = _encode(value, dtype)
        if raw is None:
            writer.add_tensor(tensor_name, data)
        else:
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
