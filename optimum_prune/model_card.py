"""The model card (``README.md``) every pruned output folder gets.

Metadata goes through ``huggingface_hub.ModelCardData`` (YAML front matter the Hub parses):
base model, ``library_name: transformers``, tags (``pruned``, the method, the pattern),
``pipeline_tag`` and the base model's licence when its card can be read locally. The body says
what was done (method, pattern, sparsity, calibration data and size, seed), the measured numbers
(sparsity, parameters, perplexity before/after when evaluated), how to load the model
(``trust_remote_code=True`` when the layers have different widths) and how to reproduce it.
"""

from __future__ import annotations

import os

from .configuration import PruningConfig


def _base_license(base_model: str | None) -> str | None:
    """The licence in the base model's card, when the base is a local folder with a README.md."""
    if not base_model or not os.path.isfile(os.path.join(base_model, "README.md")):
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(os.path.join(base_model, "README.md")).data.get("license")
    except Exception:  # an unreadable card is no reason to fail a prune
        return None


def _is_heterogeneous(model) -> bool:
    return getattr(getattr(model, "config", None), "layer_widths", None) is not None


def _rows(pairs) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in pairs if value is not None)


def build_model_card(
    model,
    config: PruningConfig,
    base_model: str | None = None,
    results: dict | None = None,
    command: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` describing ``model`` pruned with ``config``.

    ``results`` may hold ``sparsity``, ``parameters_before/after``, ``perplexity_before/after``
    (+ ``eval``: dataset, seqlen, max_windows) and ``prune_seconds``; ``command`` is the command
    line that produced the model (a Python snippet is shown otherwise).
    """
    from huggingface_hub import ModelCard, ModelCardData

    results = dict(results or {})
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    pattern = config.pattern
    tags = ["pruned", "optimum-prune", config.method, "structured-pruning" if pattern == "structured" else
            ("semi-structured-sparsity" if ":" in pattern else "unstructured-sparsity")]
    local_base = bool(base_model) and os.path.exists(base_model)
    data = ModelCardData(
        base_model=base_model if base_model and not local_base else None,  # the Hub wants a repo id
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        license=_base_license(base_model),
    )
    heterogeneous = _is_heterogeneous(model)
    name = os.path.basename(os.path.normpath(base_model)) if base_model else "the base model"
    what = (f"{config.sparsity:.0%} of every decoder layer's Linear parameters removed as whole channels / KV groups"
            if pattern == "structured" else f"{pattern} sparsity (at most {pattern.split(':')[0]} non-zeros in every "
            f"{pattern.split(':')[1]} consecutive weights of a row)" if ":" in pattern else
            f"{config.sparsity:.0%} of the weights of every pruned Linear set to zero")
    calibration = (f"{config.num_calibration_samples} windows x {config.seqlen} tokens of `{config.dataset}`"
                   if config.dataset else f"{config.num_calibration_samples} windows x {config.seqlen} tokens (passed in code)")
    setup = _rows([
        ("method", f"`{config.method}`" + (f" with options `{config.method_kwargs}`" if config.method_kwargs else "")),
        ("pattern", f"`{pattern}`"),
        ("sparsity (target)", f"{config.sparsity:g}" if config.sparsity is not None else None),
        ("calibration", calibration),
        ("seed", config.seed),
        ("sequential", config.sequential),
        ("dampening", config.dampening),
    ])
    params_before, params_after = results.get("parameters_before"), results.get("parameters_after")
    measured = _rows([
        ("measured sparsity", f"{results['sparsity']:.4f}" if "sparsity" in results else None),
        ("parameters", f"{params_before:,} -> {params_after:,}" if params_before and params_after else None),
        ("prune time", f"{results['prune_seconds']:.1f} s" if "prune_seconds" in results else None),
    ])
    evaluation = ""
    if "perplexity_after" in results:
        ev = results.get("eval", {})
        before = results.get("perplexity_before")
        evaluation = (
            "\n## Evaluation\n\n"
            f"Perplexity on `{ev.get('dataset', '?')}` ({ev.get('max_windows', '?')} windows x {ev.get('seqlen', '?')} tokens):\n\n"
            "| model | perplexity |\n|---|---|\n"
            + (f"| {name} (dense) | {before:.3f} |\n" if before is not None else "")
            + f"| this model | {results['perplexity_after']:.3f} |\n"
        )
    load_kwargs = ", trust_remote_code=True" if heterogeneous else ""
    loading = (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{load_kwargs})\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```\n'
    )
    if heterogeneous:
        loading += ("\nEvery decoder layer has its own width, which stock transformers classes cannot express: the "
                    "modelling code ships in this folder (`trust_remote_code=True`), or `import optimum_prune` first "
                    "and load without it.\n")
    reproduce = (f"```bash\n{command}\n```\n" if command else
                 "```python\nfrom optimum_prune import Pruner, PruningConfig\n\n"
                 'config = PruningConfig.from_pretrained("path/to/this/folder")  # pruning_config.json\n'
                 f'model = Pruner.from_config(config).prune("{base_model or "BASE_MODEL"}")\n```\n')
    intro = f"This model is [{name}](https://huggingface.co/{base_model})" if data.base_model else f"This model is {name}"
    content = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {name}, pruned with optimum-prune ({config.method}, {pattern})\n\n"
        f"{intro} pruned one-shot with optimum-prune: {what}.\n\n"
        f"## How it was pruned\n\n| | |\n|---|---|\n{setup}\n\n"
        + (f"## Result\n\n| | |\n|---|---|\n{measured}\n" if measured else "")
        + evaluation
        + f"\n## How to load it\n\n{loading}\n## How to reproduce it\n\n{reproduce}"
        + "\nThe full pruning configuration is in `pruning_config.json` (also under `pruning_config` in `config.json`).\n"
    )
    return ModelCard(content)
