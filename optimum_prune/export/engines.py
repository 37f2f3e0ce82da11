"""Which serving engine runs which output, and what a prune may do for the engine it is meant for.

`check_servable` is what ``serve_with`` (``--serve-with``) checks on the model before any work;
`PruningConfig` applies the rest of the engine's rules (MLP width grid, attention left whole) to the
prune itself. `where_it_runs` is the "Where it runs" table of every model card (and of
docs/deploy.md).
"""

from __future__ import annotations

from ..errors import PruningError
from .families import active_window, family_of, is_heterogeneous, is_nemotron_nas
from .gguf import gguf_refusal
from .nemotron_nas import FFN_MULT_GRID, NAS_FAMILIES, nemotron_nas_refusal

#: MoE families (their heterogeneous form is optimum-prune's own)
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def check_servable(engine: str, model_config: dict, per_layer: bool, structured: bool) -> None:
    """Refuse, in one line and before any work, a prune whose output ``engine`` could not run.

    ``model_config``: the model's ``config.json`` dict; ``per_layer``: the prune can give layers
    different widths (a global method, overrides, a sparsity profile); ``structured``: shapes change."""
    if engine == "transformers":
        return
    family = family_of(model_config)
    fix = "(--serve-with transformers keeps optimum-prune's own form; docs/deploy.md)"
    if engine == "llama.cpp":
        refusal = gguf_refusal(model_config)
        if refusal:
            raise PruningError(f"--serve-with llama.cpp: {refusal} {fix}.")
        return
    if not (structured and per_layer):
        return  # a stock checkpoint: the engine's own support for the family decides
    if family in _MOE:
        raise PruningError(f"--serve-with {engine}: {engine} needs the same expert count and width in every layer of "
                           f"a {family} model; prune every layer alike (no overrides, a layer-wise method) {fix}.")
    if family not in NAS_FAMILIES:
        raise PruningError(f"--serve-with {engine}: per-layer widths reach {engine} only in the Nemotron-NAS form, "
                           f"which describes {', '.join(NAS_FAMILIES)} layers, not {family}; prune every layer alike "
                           f"(no overrides, a layer-wise method) {fix}.")
    if active_window(model_config) is not None:
        raise PruningError(f"--serve-with {engine}: the model's sliding-window attention has no Nemotron-NAS field; "
                           f"prune every layer alike {fix}.")


_COMMANDS = {
    "transformers": "AutoModelForCausalLM.from_pretrained(folder{remote})",
    "vllm": "vllm serve folder{remote_flag}",
    "sglang": "python -m sglang.launch_server --model-path folder{remote_flag}",
    "tensorrt-llm": "trtllm-serve folder",
    "mlx": "mlx_lm.generate --model folder",
    "llama.cpp": "llama-server -m {gguf}",
}


def where_it_runs(config: dict, pattern: str, gguf_file: str | None = None) -> list[tuple[str, str, str]]:
    """(engine, yes / no / untested, how) for a saved output's ``config.json`` and its pattern."""
    family = family_of(config)
    nas, own_form = is_nemotron_nas(config), bool(config.get("layer_widths"))
    remote = nas or own_form
    fill = dict(remote=", trust_remote_code=True" if remote else "", remote_flag=" --trust-remote-code" if nas else "",
                gguf=gguf_file or "model.gguf")
    sparse = pattern != "structured"
    note = " (no faster than the dense model: zeros are stored and multiplied)" if sparse else ""
    rows = [("transformers", "yes", _COMMANDS["transformers"].format(**fill) + note)]
    if own_form:
        why = nemotron_nas_refusal(config)
        for engine in ("vllm", "sglang", "tensorrt-llm", "mlx"):
            rows.append((engine, "no", f"optimum-prune's own form: {why}; prune with --serve-with {engine}"))
    elif nas:
        grid = all("ffn_mult" in block.get("ffn", {}) or block.get("ffn", {}).get("no_op")
                   for block in config.get("block_configs", []))
        rows.append(("vllm", "yes", _COMMANDS["vllm"].format(**fill)))
        for engine in ("sglang", "tensorrt-llm", "mlx"):
            if grid:
                rows.append((engine, "untested here", _COMMANDS[engine].format(**fill) + " (reads ffn_mult)"))
            else:
                rows.append((engine, "no", f"some MLP width is not a multiple of {FFN_MULT_GRID} (ffn_mult only); "
                                           f"prune with --serve-with {engine}"))
    else:
        for engine in ("vllm", "sglang", "tensorrt-llm", "mlx"):
            verdict = "yes" if engine == "vllm" and family in NAS_FAMILIES else "stock checkpoint"
            rows.append((engine, verdict, _COMMANDS[engine].format(**fill) + note))
    refusal = gguf_refusal(config)
    if gguf_file:
        rows.append(("llama.cpp", "yes", _COMMANDS["llama.cpp"].format(**fill) + note))
    elif refusal:
        rows.append(("llama.cpp", "no", refusal))
    else:
        arch = "deci" if is_heterogeneous(config) else "stock"
        rows.append(("llama.cpp", "yes", f"export_gguf(folder) ({arch} GGUF), then " +
                     _COMMANDS["llama.cpp"].format(**fill) + note))
    return rows
