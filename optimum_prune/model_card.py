"""The model card (``README.md``) every pruned output folder gets.

Metadata goes through ``huggingface_hub.ModelCardData`` (YAML front matter the Hub parses):
base model, ``library_name: transformers``, tags (``pruned``, the method, the pattern),
``pipeline_tag`` and the base model's licence when its card can be read locally. The body says
what was done (method, pattern, sparsity, calibration data and size, seed), the measured numbers
(sparsity, parameters, perplexity before/after when evaluated), how to load the model
(``trust_remote_code=True`` when the layers have different widths) and how to reproduce it.
"""

from __future__ import annotations

import json
import os

from .assets import packaged_origin
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


def _what_was_done(config: PruningConfig, heterogeneous: bool, results: dict) -> str:
    pattern = config.pattern
    if results.get("removed_blocks"):
        return (f"{len(results['removed_blocks'])} attention / MLP blocks left out and "
                f"{len(results['removed_layers'])} whole decoder layers removed (depth pruning, {config.sparsity:.0%} "
                f"of the decoder layers' parameters asked for): the layers that lost a block pass the residual "
                f"stream through it (`no_op` blocks)")
    if "removed_layers" in results:
        return (f"{len(results['removed_layers'])} whole decoder layers removed (depth pruning, "
                f"{config.sparsity:.0%} of the decoder layers' parameters asked for): a stock architecture with fewer "
                f"layers")
    if pattern == "structured" and heterogeneous:
        return (f"{config.sparsity:.0%} of the parameters of the channel groups it prunes (MLP channels, KV groups) "
                "removed, spread unevenly over the layers: every decoder layer has its own width")
    if pattern == "structured":
        return f"{config.sparsity:.0%} of every decoder layer's Linear parameters removed as whole channels / KV groups"
    if ":" in pattern:
        n, m = pattern.split(":")
        return f"{pattern} sparsity (at most {n} non-zeros in every {m} consecutive weights of a row)"
    return f"{config.sparsity:.0%} of the weights of every pruned Linear set to zero"


def _rows(pairs) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in pairs if value is not None)


_STAGES = (("before", "{name} (dense)"), ("after", "pruned"), ("recovered", "pruned + {recovery}"))


def _recovery_text(recovery: dict | None) -> str | None:
    if not recovery:
        return None
    if recovery.get("method") == "distill":
        from .recovery.distill import loss_is_kl

        curve = _loss_curve(recovery.get("losses") or [], "KL" if loss_is_kl(recovery) else "loss")
        trained = (f"LoRA adapters (rank {recovery['lora_rank']}, alpha {recovery['lora_alpha']}) trained and merged"
                   if recovery.get("lora_rank") else "every parameter trained")
        return (f"{_distill_loss_text(recovery)}, {trained} {recovery['steps']} steps x "
                f"{recovery['batch_size']} windows of {recovery['seqlen']} tokens ({recovery['tokens']:,} tokens) at lr "
                f"{recovery['lr']:g} in {recovery['seconds']:.0f} s; {'KL' if loss_is_kl(recovery) else 'loss'} "
                f"{recovery['loss_first']:.4f} -> {recovery['loss_last']:.4f}{curve}; sparsity masks kept through "
                f"training{_trained_on(recovery)}")
    return (f"LoRA (rank {recovery['rank']}, alpha {recovery['alpha']}) trained {recovery['steps']} steps x "
            f"{recovery['batch_size']} windows of {recovery['seqlen']} tokens at lr {recovery['lr']:g} in "
            f"{recovery['seconds']:.0f} s (training loss {recovery['loss_first']:.3f} -> {recovery['loss_last']:.3f}), "
            f"merged; sparsity masks re-applied{_trained_on(recovery)}")


def _distill_loss_text(recovery: dict) -> str:
    """What the distillation's loss was: the KL at its temperature, the cross-entropy share, the
    hidden-state term (plain fine-tuning when the cross-entropy is all of it)."""
    ce, hidden = recovery.get("ce_weight", 0.0), recovery.get("hidden_weight", 0.0)
    if ce >= 1 and not hidden:
        return "fine-tuning on the next-token cross-entropy (no teacher)"
    text = f"distillation from the dense model (forward KL of the logits at temperature {recovery['temperature']:g}"
    if ce:
        text += f", {ce:g} of the loss the next-token cross-entropy"
    if hidden:
        text += f", plus {hidden:g} x the distance of the hidden states to the dense model's"
    return text + ")"


def _trained_on(recovery: dict) -> str:
    return f"; trained on {recovery['dataset']}" if recovery.get("dataset") else ""


def _loss_curve(losses: list[float], what: str = "KL", points: int = 6) -> str:
    """A few points of a distillation's loss curve: ' (KL by step: 1: 0.5200, 20: 0.3100, ...)'."""
    if len(losses) < 2:
        return ""
    steps = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return f" ({what} by step: " + ", ".join(f"{s + 1}: {losses[s]:.4f}" for s in steps) + ")"


def _evaluation_section(results: dict, name: str) -> str:
    """Perplexity and zero-shot accuracy for each stage that was measured (dense, pruned, recovered)."""
    recovery = "distillation" if (results.get("recovery") or {}).get("method") == "distill" else "LoRA recovery"
    stages = [(stage, label.format(name=name, recovery=recovery)) for stage, label in _STAGES
              if f"perplexity_{stage}" in results or f"zero_shot_{stage}" in results]
    if not stages:
        return ""
    columns = []  # (header, stage -> value text)
    if any(f"perplexity_{stage}" in results for stage, _ in stages):
        ev = results.get("eval", {})
        header = f"perplexity ({ev.get('dataset', '?')}, {ev.get('max_windows', '?')} x {ev.get('seqlen', '?')} tokens)"
        columns.append((header, lambda stage: f"{results[f'perplexity_{stage}']:.3f}" if f"perplexity_{stage}" in results else "-"))
    tasks = sorted({task for stage, _ in stages for task in results.get(f"zero_shot_{stage}", {})})
    for task in tasks:
        def cell(stage, task=task):
            metrics = results.get(f"zero_shot_{stage}", {}).get(task, {})
            metric = next((m for m in ("acc_norm", "acc", "exact_match", "f1") if m in metrics), None)
            return "-" if metric is None else f"{metrics[metric]:.4f} ({metric})"
        columns.append((task, cell))
    settings = results.get("zero_shot_settings")
    note = (f"\nZero-shot accuracy with lm-eval ({settings.get('num_fewshot', 0)}-shot"
            f"{', limit ' + str(settings['limit']) if settings.get('limit') else ''}).\n" if settings else "")
    head = "| model | " + " | ".join(header for header, _ in columns) + " |\n"
    rule = "|---|" + "---|" * len(columns) + "\n"
    body = "".join(f"| {label} | " + " | ".join(cell(stage) for _, cell in columns) + " |\n" for stage, label in stages)
    return "\n## Evaluation\n\n" + head + rule + body + note


def _eval_results(results: dict, stage: str) -> list:
    """``model-index`` entries (huggingface_hub ``EvalResult``) for the final model."""
    from huggingface_hub import EvalResult

    entries = []
    if f"perplexity_{stage}" in results:
        dataset = str(results.get("eval", {}).get("dataset", "text"))
        entries.append(EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                                  metric_type="perplexity", metric_value=round(results[f"perplexity_{stage}"], 4)))
    for task, metrics in results.get(f"zero_shot_{stage}", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                entries.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                          metric_type=metric, metric_value=round(metrics[metric], 4)))
    return entries


def build_model_card(
    model,
    config: PruningConfig,
    base_model: str | None = None,
    results: dict | None = None,
    command: str | None = None,
    serving: list[tuple[str, str, str]] | None = None,
):
    """A ``huggingface_hub.ModelCard`` describing ``model`` pruned with ``config``.

    ``results`` may hold ``sparsity``, ``parameters_before/after``, ``prune_seconds``,
    ``perplexity_{before,after,recovered}`` (+ ``eval``: dataset, seqlen, max_windows),
    ``zero_shot_{before,after,recovered}`` (``{task: {metric: value}}``, + ``zero_shot_settings``)
    and ``recovery`` (what `recover_lora` returned); ``command`` is the command
    line that produced the model (a Python snippet is shown otherwise); ``serving``: the rows
    (engine, verdict, how to start it) of `optimum_prune.export.engines.where_it_runs` for the saved
    folder, and ``results["form"]``: which form a heterogeneous folder was saved in and why.
    """
    from huggingface_hub import ModelCard

    results = dict(results or {})
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    pattern = config.pattern
    origin = packaged_origin(base_model) if base_model else None
    if origin is not None:  # a packaged model: the Hub repo it comes from is the base
        hub_base, provenance = origin
    else:  # the Hub wants a repo id, not a local folder
        hub_base = base_model if base_model and not os.path.exists(base_model) else None
        provenance = None
    name = os.path.basename(os.path.normpath(hub_base or base_model)) if base_model else "the base model"
    final = "recovered" if "recovery" in results else "after"
    data = _card_data(config, results, name if base_model else "model", base_model, hub_base, final)
    heterogeneous = _is_heterogeneous(model)
    what = _what_was_done(config, heterogeneous, results)
    setup, measured = _setup_rows(config), _measured_rows(results)
    evaluation = _evaluation_section(results, name)
    loading = _loading_section(heterogeneous, results)
    where = _serving_section(serving, config)
    reproduce = (f"```bash\n{command}\n```\n" if command else
                 "```python\nfrom optimum_prune import Pruner, PruningConfig\n\n"
                 'config = PruningConfig.from_pretrained("path/to/this/folder")  # pruning_config.json\n'
                 f'model = Pruner.from_config(config).prune("{base_model or "BASE_MODEL"}")\n```\n')
    intro = f"This model is [{name}](https://huggingface.co/{hub_base})" if hub_base else f"This model is {name}"
    if provenance:
        intro += f" ({provenance})"
    content = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {name}, pruned with optimum-prune ({config.method}, {pattern})\n\n"
        f"{intro} pruned one-shot with optimum-prune: {what}.\n\n"
        f"## How it was pruned\n\n| | |\n|---|---|\n{setup}\n\n"
        + (f"## Result\n\n| | |\n|---|---|\n{measured}\n" if measured else "")
        + evaluation
        + f"\n## How to load it\n\n{loading}" + where + f"\n## How to reproduce it\n\n{reproduce}"
        + "\nThe full pruning configuration is in `pruning_config.json` (also under `pruning_config` in `config.json`).\n"
    )
    return ModelCard(content)


def _card_data(config: PruningConfig, results: dict, name: str, base_model, hub_base, final: str):
    """The card's metadata (YAML header): base model, tags, license, evaluation results."""
    from huggingface_hub import ModelCardData

    pattern = config.pattern
    tags = ["pruned", "optimum-prune", config.method, "structured-pruning" if pattern == "structured" else
            ("semi-structured-sparsity" if ":" in pattern else "unstructured-sparsity")]
    return ModelCardData(
        model_name=f"{name}-{config.method}-pruned",
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags + ([f"{(results['recovery'] or {}).get('method', 'lora')}-recovery"] if "recovery" in results else []),
        license=_base_license(base_model),
        eval_results=_eval_results(results, final) or None,
    )


def _setup_rows(config: PruningConfig) -> str:
    """The card's "How it was pruned" table."""
    calibration = (f"{config.num_calibration_samples} windows x {config.seqlen} tokens of `{config.dataset}`"
                   if config.dataset else f"{config.num_calibration_samples} windows x {config.seqlen} tokens (passed in code)")
    return _rows([
        ("method", f"`{config.method}`" + (f" with options `{json.dumps(config.method_kwargs)}`" if config.method_kwargs else "")),
        ("pattern", f"`{config.pattern}`"),
        ("sparsity (target)", f"{config.sparsity:g}" if config.sparsity is not None else None),
        ("targets", ", ".join(f"`{p}`" for p in config.targets) if config.targets else None),
        ("left out (ignore)", ", ".join(f"`{p}`" for p in config.ignore) if config.ignore else None),
        ("calibration", calibration),
        ("seed", config.seed),
        ("sequential", config.sequential),
        ("dampening", config.dampening),
    ])


def declined_text(declined: dict[str, float]) -> str:
    """``model.layers.28.mlp (2.55x)``, ...: the channel groups whose least-squares re-fit was declined,
    each with that re-fit's Frobenius norm over the dense consumer's."""
    return ", ".join(f"{name} ({growth:.2f}x)" for name, growth in declined.items())


def _measured_rows(results: dict) -> str:
    """The card's "Result" table."""
    params_before, params_after = results.get("parameters_before"), results.get("parameters_after")
    return _rows([
        ("measured sparsity", f"{results['sparsity']:.4f} of the targeted weights" if "sparsity" in results else None),
        ("coverage", f"the targeted weights are {results['coverage']:.1%} of the decoder layers' weights"
         if "coverage" in results else None),
        ("left dense", results.get("unhandled_note")),
        ("left dense on purpose", (results.get("left_out_note") or "").removeprefix("left dense: ") or None),
        ("MoE experts", _experts_text(results.get("experts"))),
        ("experts removed", _removed_experts_text(results.get("removed_experts"))),
        ("decoder layers removed", ", ".join(map(str, results["removed_layers"])) if results.get("removed_layers")
         else None),
        ("blocks left out", ", ".join(results["removed_blocks"]) if results.get("removed_blocks") else None),
        ("re-fits declined", f"kept columns (least-squares re-fit over max_restore_growth): "
         f"{declined_text(results['declined_refits'])}" if results.get("declined_refits") else None),
        ("sparsity per layer", _layer_sparsity_text(results.get("layer_sparsity"))),
        ("parameters", f"{params_before:,} -> {params_after:,}" if params_before and params_after else None),
        ("prune time", f"{results['prune_seconds']:.1f} s" if "prune_seconds" in results else None),
        ("recovery", _recovery_text(results.get("recovery"))),
        ("published as", f"[{results['hub_repo']}](https://huggingface.co/{results['hub_repo']})"
         if results.get("hub_repo") else None),
    ])


def _loading_section(heterogeneous: bool, results: dict) -> str:
    """The card's "How to load it" section."""
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
    if results.get("form"):
        loading += f"\n{results['form']}\n"
    return loading


def _serving_section(serving, config: PruningConfig) -> str:
    if not serving:
        return ""
    rows = "".join(f"| {engine} | {verdict} | {how} |\n" for engine, verdict, how in serving)
    aim = (f"\nPruned for `--serve-with {config.serve_with}`: only what that engine reads was produced.\n"
           if config.serve_with != "transformers" else "")
    return ("\n## Where it runs\n\n| engine | runs it | how |\n|---|---|---|\n" + rows + aim +
            "\nSee optimum-prune's docs/deploy.md for each engine.\n")


def _layer_sparsity_text(profile: dict | None) -> str | None:
    if not profile:
        return None
    if profile.get("patterns"):
        values = ", ".join(profile["patterns"])
        return f"`{profile['profile']}` profile, N:M pattern layer by layer: {values}"
    values = ", ".join(f"{v:.3f}" for v in profile["per_layer"])
    return f"`{profile['profile']}` profile, layer by layer: {values}"


def _removed_experts_text(removed: dict | None) -> str | None:
    if not removed:
        return None
    counts = sorted({len(v) for v in removed.values()})
    per_block = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"{sum(map(len, removed.values()))} routed experts removed from {len(removed)} MoE blocks ({per_block} "
            f"per block, with their router rows; which ones: `removed_experts` in pruning_results.json)")


def _experts_text(experts: dict | None) -> str | None:
    if not experts:
        return None
    tokens = "the tokens routed to each" if experts["calibration"] == "routed" else "every calibration token"
    text = f"{experts['matrices']} expert matrices of fused banks, each solved on {tokens}"
    if experts["magnitude_fallbacks"]:
        text += (f"; {experts['magnitude_fallbacks']} of them received fewer than {experts['min_tokens']} tokens "
                 f"and were pruned by magnitude")
    return text
