"""``optimum-cli prune``: prune a causal LM from the command line.

This module is imported by optimum-cli at start-up (through ``optimum/commands/register``), so it
imports nothing heavy at module level: torch, transformers and the pruning code load in ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


# The PruningConfig fields that are CLI flags: (field, group, argparse keywords), in --help order.
# The flag is the field's name with dashes (``flag`` overrides it); every flag defaults to None,
# which means "from --config, then from PruningConfig". Fields not here: ``overrides`` (config
# files and Python only), ``method_kwargs`` (--method-kwargs, JSON), ``sequential`` (--one-pass);
# tests/test_cli.py checks that this table and the config's fields agree.
CONFIG_FLAGS = (
    ("method", "pruning", dict(help="Registered method name (magnitude, wanda, sparsegpt, ...).")),
    ("sparsity", "pruning", dict(type=float, help="Fraction of weights removed, in [0, 1).")),
    ("pattern", "pruning", dict(help="unstructured (default), N:M such as 2:4, or structured.")),
    ("targets", "pruning", dict(nargs="+", help="Module-name patterns to prune (glob or re:regex).")),
    ("ignore", "pruning", dict(nargs="+", help="Module-name patterns to leave dense.")),
    ("sparsity_profile", "pruning", dict(choices=("uniform", "owl", "sensitivity"), help="How the sparsity is spread over the "
                                         "layers: uniform (default), owl (more outliers: less sparsity) or "
                                         "sensitivity (measured loss per layer); the average is --sparsity.")),
    ("owl_lambda", "pruning", dict(type=float, help="owl: layer sparsities within --sparsity +- this (default 0.08).")),
    ("owl_threshold", "pruning", dict(type=float, help="owl: a Wanda score above this x its layer's mean is an "
                                                       "outlier (default 5).")),
    ("sensitivity_samples", "pruning", dict(type=int, help="sensitivity: calibration windows that measure each "
                                                           "layer's loss (default 2).")),
    ("layer_patterns", "pruning", dict(nargs="+", help="N:M with --sparsity-profile sensitivity: patterns a layer "
                                                       "may get instead of --pattern (e.g. 4:8 dense); --sparsity is "
                                                       "then the average asked for.")),
    ("layer_sparsity_min", "pruning", dict(type=float, help="Profiles: the lowest sparsity of a layer (default 0).")),
    ("layer_sparsity_max", "pruning", dict(type=float, help="Profiles: the highest sparsity of a layer (default 0.99).")),
    ("channel_multiple", "pruning", dict(type=int, help="Structured: MLP channels kept per layer rounded to a "
                                                         "multiple of this (default 32; 1: exact).")),
    ("serve_with", "pruning", dict(choices=("transformers", "vllm", "sglang", "tensorrt-llm", "mlx", "llama.cpp"),
                                   help="The engine the output is meant for: prune only what it reads (MLP widths "
                                        "on its grid, attention whole where it keeps every query head); refused "
                                        "before any work where it cannot (docs/deploy.md). Default transformers.")),
    ("expert_calibration", "pruning", dict(choices=("routed", "all"), help="MoE experts: statistics of the tokens "
                                           "routed to each expert (default) or of every token.")),
    ("min_expert_tokens", "pruning", dict(type=int, help="MoE experts with fewer routed tokens are pruned by "
                                                          "magnitude instead (default 16).")),
    ("dataset", "data", dict(help="Hub dataset, local .txt/.json/.jsonl, or packaged:wiki-leads.")),
    ("dataset_config", "data", dict()),
    ("dataset_split", "data", dict()),
    ("text_column", "data", dict()),
    ("messages_column", "data", dict(help="Chat data: the column of conversations, rendered with the chat template "
                                          "(default messages).")),
    ("calibration_format", "data", dict(choices=("auto", "chat", "text"), help="auto: conversations when the "
                                        "messages column exists, else text (default); chat: require conversations; "
                                        "text: plain text only.")),
    ("num_calibration_samples", "data", dict(flag="--num-samples", type=int, help="Calibration windows (default 64).")),
    ("seqlen", "data", dict(type=int, help="Tokens per window (default 512).")),
    ("batch_size", "data", dict(type=int, help="Windows per forward pass (default 8).")),
    ("seed", "data", dict(type=int)),
    ("dampening", "data", dict(type=float)),
)


def _flag(field: str, options: dict) -> str:
    return options.get("flag", "--" + field.replace("_", "-"))


def _add_config_flags(parser, group: str) -> None:
    """Add the flags of ``CONFIG_FLAGS`` that belong to ``group`` to ``parser`` (an argument group)."""
    for field, where, options in CONFIG_FLAGS:
        if where == group:
            flag = _flag(field, options)
            parser.add_argument(flag, dest=field, default=None, **{k: v for k, v in options.items() if k != "flag"})


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and output")
    model.add_argument("--model", required=True, help="Hub id, local folder, or packaged:smollm2-135m.")
    model.add_argument("--output", default=None, help="Folder for the pruned checkpoint (must be new or empty); "
                                                      "required unless --dry-run.")
    model.add_argument("--dry-run", action="store_true",
                       help="Print the plan (tasks per target), the estimated peak memory per device and time, "
                            "and exit: only the model's configuration is read, nothing is written.")
    model.add_argument("--overwrite", action="store_true",
                       help="Replace --output if it is a previous optimum-prune output (holds pruning_config.json).")
    model.add_argument("--gguf", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                       help="Also write a GGUF file of this type into --output for llama.cpp / Ollama / LM Studio "
                            "(Llama, Mistral, Qwen2; checked before the prune).")
    model.add_argument("--push-to-hub", default=None, metavar="REPO",
                       help="After a successful save, upload the output folder to this Hub repo (created if missing).")
    model.add_argument("--hub-private", action="store_true", help="With --push-to-hub: create the repo private.")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    model.add_argument("--device", default=None, help="Compute device for each layer, e.g. cuda:0 (default: where it lives).")
    model.add_argument("--device-map", default=None, help="accelerate device_map for loading, e.g. auto.")
    model.add_argument("--max-memory", default=None,
                       help="With --device-map: memory per device, e.g. '0=20GiB,cpu=60GiB' (the rest is offloaded to disk).")
    model.add_argument("--offload-folder", default=None, help="Where --device-map offloads weights to disk.")
    model.add_argument("--activations", choices=("device", "cpu", "disk"), default="device",
                       help="Where the calibration activations wait between layers: where they were produced "
                            "(default), in CPU memory, or on disk (one file per batch). Same result.")
    model.add_argument("--activation-folder", default=None,
                       help="With --activations disk: folder for those files (default: the system's temp folder).")

    method = parser.add_argument_group("pruning (defaults come from --config, then from PruningConfig)")
    method.add_argument("--config", default=None,
                        help="A pruning_config.json, a folder holding one, or a Hub repo id; the flags below override it.")
    _add_config_flags(method, "pruning")
    method.add_argument("--method-kwargs", default=None, help='Method options as JSON, e.g. \'{"blocksize": 64}\'.')
    method.add_argument("--one-pass", action="store_true", help="Non-sequential: each layer runs once (faster).")

    data = parser.add_argument_group("calibration data")
    _add_config_flags(data, "data")

    reliability = parser.add_argument_group("checkpoints and resources")
    reliability.add_argument("--checkpoint-dir", default=None,
                             help="Commit every finished decoder layer here; deleted once the output is saved.")
    reliability.add_argument("--resume", action="store_true",
                             help="Continue the interrupted prune in --checkpoint-dir (same model, config and data).")
    reliability.add_argument("--skip-memory-check", action="store_true",
                             help="Do not refuse a prune whose estimated per-layer memory exceeds the free memory.")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", action="store_true", help="Perplexity before and after pruning.")
    evaluation.add_argument(
        "--eval-dataset",
        default=None,
        help="Text for --eval (same forms as --dataset); default: packaged:wiki-leads-eval when calibrating on "
        "packaged:wiki-leads.",
    )
    evaluation.add_argument("--eval-windows", type=int, default=64, help="Evaluation windows of --seqlen tokens.")
    evaluation.add_argument("--tasks", default=None,
                            help="lm-eval tasks before and after pruning, comma-separated (boolq,arc_easy,...); needs lm-eval.")
    evaluation.add_argument("--tasks-limit", type=float, default=None,
                            help="At most this many documents per task (or this fraction, if < 1).")
    evaluation.add_argument("--tasks-fewshot", type=int, default=0, help="Few-shot examples per task (default 0).")
    evaluation.add_argument("--tasks-include", default=None, help="Folder of extra lm-eval task YAML files (local tasks).")
    evaluation.add_argument("--tasks-batch-size", type=int, default=8, help="Batch size of the lm-eval runs.")

    recovery = parser.add_argument_group("recovery (after pruning, before saving)")
    recovery.add_argument("--recover", choices=["lora"], default=None,
                          help="Short LoRA fine-tune on the calibration text, merged back; sparsity masks re-applied.")
    recovery.add_argument("--recover-steps", type=int, default=100, help="Optimiser steps (default 100).")
    recovery.add_argument("--recover-lr", type=float, default=2e-4, help="Peak learning rate (default 2e-4).")
    recovery.add_argument("--recover-rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank).")
    recovery.add_argument("--recover-batch-size", type=int, default=4, help="Windows of --seqlen tokens per step (default 4).")
    recovery.add_argument("--recover-samples", type=int, default=256,
                          help="Training windows drawn from --dataset (seed + 1, default 256).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def build_config(args):
    """PruningConfig from --config plus the flags given explicitly."""
    from optimum_prune.configuration import PruningConfig
    from optimum_prune.errors import PruningError

    base = PruningConfig.from_pretrained(args.config).to_dict() if args.config else {}
    for key in ("format_version", "optimum_prune_version"):
        base.pop(key, None)
    for field, _, _ in CONFIG_FLAGS:
        value = getattr(args, field)
        if value is not None:
            base[field] = value
    if args.pattern is not None and args.sparsity is None and args.config:
        base.pop("sparsity", None)  # a new pattern brings its own default sparsity
    if args.one_pass:
        base["sequential"] = False
    if args.method_kwargs is not None:
        try:
            kwargs = json.loads(args.method_kwargs)
        except json.JSONDecodeError as err:
            raise PruningError(f"--method-kwargs must be a JSON object ({err}), e.g. '{{\"blocksize\": 64}}'.") from None
        base["method_kwargs"] = kwargs
    return PruningConfig.from_dict(base)


def run_prune(args) -> int:
    from optimum_prune.errors import PruningError

    try:
        with _warnings_on_stderr():
            return _run(args)
    except PruningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to the output folder; {_resume_hint(args)}", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _warnings_on_stderr():
    """optimum-prune's log warnings as ``warning: ...`` lines on stderr, each once: through this
    handler only, not also through the root logger's handlers (or Python's last-resort one)."""
    import logging

    class Prefix(logging.Formatter):
        def format(self, record):
            return f"{record.levelname.lower()}: {record.getMessage()}"

    logger = logging.getLogger("optimum_prune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(Prefix())
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _resume_hint(args) -> str:
    """How to go on after an interrupted run."""
    from optimum_prune.calibration.checkpoint import STATE_NAME

    state = os.path.join(args.checkpoint_dir, STATE_NAME) if args.checkpoint_dir else None
    if state and os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as handle:
                done = json.load(handle)
            progress = f"{done['next_layer']} of {done['num_layers']} layers are"
        except (OSError, ValueError, KeyError, TypeError):
            progress = "the finished layers are"
        return (f"{progress} saved in {args.checkpoint_dir}: run the same command with --resume to continue "
                f"from there.")
    if args.checkpoint_dir:
        return "no layer was finished yet: run the same command again to start over."
    return "run it again (add --checkpoint-dir DIR to be able to resume an interrupted prune)."


def _max_memory(text: str) -> dict:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    from optimum_prune.errors import PruningError

    memory = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise PruningError(f"--max-memory takes DEVICE=SIZE pairs such as '0=20GiB,cpu=60GiB', got {text!r}.")
        key = key.strip()
        memory[int(key) if key.isdigit() else key] = value.strip()
    return memory


def _limit(value):
    """--tasks-limit: a document count (>= 1) or a fraction (< 1)."""
    return None if value is None else (int(value) if value >= 1 else value)


def _check_lm_eval() -> None:
    import importlib.util

    from optimum_prune.errors import PruningError

    if importlib.util.find_spec("lm_eval") is None:
        raise PruningError("--tasks needs lm-eval: pip install 'optimum-prune[eval]' (or lm-eval).")


def _local_inputs(args, config) -> list[tuple[str, str | None]]:
    """(description, path) of what the run reads, where it is a local path."""
    return [("the model", args.model), ("the calibration data", config.dataset), ("--config", args.config),
            ("--eval-dataset", args.eval_dataset), ("--tasks-include", args.tasks_include)]


def check_paths(args, config):
    """Every path the run writes, checked against each other and the inputs (seconds, nothing
    written); returns the `OutputFolder` to reserve."""
    from optimum_prune.output import preflight

    return preflight(args.output, args.overwrite, checkpoint_dir=args.checkpoint_dir,
                     activation_folder=args.activation_folder if args.activations == "disk" else None,
                     offload_folder=args.offload_folder, inputs=_local_inputs(args, config))


def reserve_paths(args, output):
    """Lock the output target and the checkpoint folder for this run (refused at once if another run
    holds either); returns the `LayerCheckpoint` (or None)."""
    from optimum_prune.calibration.checkpoint import LayerCheckpoint
    from optimum_prune.calibration.distributed import is_main_process

    checkpoint = LayerCheckpoint(args.checkpoint_dir, resume=args.resume) if args.checkpoint_dir else None
    if is_main_process():  # with several processes rank 0 writes the output
        output.reserve()
    try:
        if checkpoint is not None:
            checkpoint.check_start()
    except BaseException:
        output.release()
        raise
    return checkpoint


def _run(args) -> int:
    from optimum_prune.errors import PruningError, check_positive_int
    from optimum_prune.pruner import Pruner

    config = build_config(args)
    if args.dry_run:
        return _dry_run(args, config)
    if args.output is None:
        raise PruningError("--output FOLDER is required: where the pruned checkpoint goes (--dry-run needs none).")
    output = check_paths(args, config)
    if args.no_progress:  # also the bars of transformers (loading, saving) and datasets (reading files)
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    if args.eval_windows < 1:
        raise PruningError("--eval-windows must be at least 1.")
    if args.tasks_limit is not None and not args.tasks_limit > 0:
        raise PruningError("--tasks-limit must be a positive count or fraction.")
    if args.tasks_fewshot < 0 or args.tasks_batch_size < 1:
        raise PruningError("--tasks-fewshot must be >= 0 and --tasks-batch-size >= 1.")
    if args.hub_private and not args.push_to_hub:
        raise PruningError("--hub-private needs --push-to-hub REPO.")
    if args.push_to_hub:
        from optimum_prune.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    eval_data = args.eval_dataset
    if args.eval and eval_data is None:
        if config.dataset == "packaged:wiki-leads":
            eval_data = "packaged:wiki-leads-eval"
        else:
            raise PruningError("--eval needs --eval-dataset (held-out text: a local file, or packaged:wiki-leads-eval).")
    from optimum_prune.calibration.distributed import init_from_env

    if init_from_env(args.device):  # under torchrun / accelerate launch
        if args.recover or args.tasks:
            raise PruningError("--recover and --tasks run in one process only; evaluate or recover the saved model "
                               "in a separate single-process run.")
    pruner = Pruner(config)
    pruner.check_arguments(config.dataset, args.checkpoint_dir, args.resume, args.activations, args.activation_folder)
    _check_serving(args, pruner)

    recovery = None
    if args.recover:
        from optimum_prune.recovery import LoraRecoveryConfig

        recovery = LoraRecoveryConfig(steps=args.recover_steps, lr=args.recover_lr, rank=args.recover_rank,
                                      alpha=2 * args.recover_rank, batch_size=args.recover_batch_size, seed=config.seed)
        check_positive_int(args.recover_samples, "--recover-samples")
        if config.dataset is None:
            raise PruningError("--recover trains on text from --dataset; pass --dataset.")
    tasks = None
    if args.tasks:
        from optimum_prune.evaluation.zero_shot import parse_tasks

        tasks = parse_tasks(args.tasks)
        _check_lm_eval()

    load_kwargs = {}
    if args.max_memory:
        load_kwargs["max_memory"] = _max_memory(args.max_memory)
    if args.offload_folder:
        load_kwargs["offload_folder"] = args.offload_folder
    if load_kwargs and not args.device_map:
        raise PruningError("--max-memory and --offload-folder need --device-map (e.g. auto).")
    checkpoint = reserve_paths(args, output)
    try:
        return _prune(args, config, pruner, output, recovery, tasks, eval_data, load_kwargs)
    finally:
        if checkpoint is not None:
            checkpoint.release()
        output.release()


def _check_serving(args, pruner) -> None:
    """--serve-with and --gguf against the model's config.json, before the model loads."""
    if pruner.config.serve_with == "transformers" and args.gguf is None:
        return
    from optimum_prune.pruner import load_model_config

    pruner.check_serving(load_model_config(args.model).to_dict(), gguf=args.gguf)


def _dry_run(args, config) -> int:
    """``--dry-run``: the plan and its estimates, from the model's configuration alone; nothing written."""
    from optimum_prune.pruner import Pruner

    pruner = Pruner(config)
    pruner.check_arguments(config.dataset, args.checkpoint_dir, args.resume, args.activations, args.activation_folder)
    _check_serving(args, pruner)
    print(pruner.plan(args.model, device=args.device, dtype=args.dtype,
                      checkpoint=args.checkpoint_dir is not None).describe(), flush=True)
    return 0


def _prune(args, config, pruner, output, recovery, tasks, eval_data, load_kwargs) -> int:
    """Load, evaluate, prune, recover and save, once every input is checked and the paths are reserved."""
    import shlex
    import time

    from optimum_prune.calibration.data import check_seqlen
    from optimum_prune.evaluation import perplexity
    from optimum_prune.pruner import load_model, save_pruned

    progress = not args.no_progress
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device_map, **load_kwargs)
    if pruner.method.needs_calibration or args.eval or recovery is not None:  # what runs windows of --seqlen
        check_seqlen(getattr(model, "config", None), config.seqlen)
    results = {}

    def evaluate(stage: str) -> None:
        if args.eval:
            results[f"perplexity_{stage}"] = perplexity(
                model, tokenizer, eval_data, seqlen=config.seqlen, max_windows=args.eval_windows, progress=progress
            )
            print(f"perplexity {stage}: {results[f'perplexity_{stage}']:.3f}", flush=True)
        if tasks:
            from optimum_prune.evaluation.zero_shot import zero_shot

            results[f"zero_shot_{stage}"] = zero_shot(
                model, tokenizer, tasks, num_fewshot=args.tasks_fewshot, limit=_limit(args.tasks_limit),
                batch_size=args.tasks_batch_size, include_path=args.tasks_include, seed=config.seed)
            print(f"zero-shot {stage}: {json.dumps(results[f'zero_shot_{stage}'])}", flush=True)

    evaluate("before")
    results["parameters_before"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    pruner.prune(model, tokenizer=tokenizer, device=args.device, progress=progress, checkpoint_dir=args.checkpoint_dir,
                 resume=args.resume, check_memory=not args.skip_memory_check, activations=args.activations,
                 activation_folder=args.activation_folder)
    results["prune_seconds"] = time.perf_counter() - start
    report = pruner.report
    results["sparsity"] = report.overall_sparsity
    results["parameters_after"] = sum(p.numel() for p in model.parameters())
    if report.coverage is not None:
        results["coverage"] = report.coverage
    if report.unhandled:
        results["unhandled_weights"] = dict(report.unhandled)
    if report.expert_matrices:
        results["experts"] = {"matrices": report.expert_matrices, "calibration": config.expert_calibration,
                              "min_tokens": config.min_expert_tokens,
                              "magnitude_fallbacks": sum(report.expert_fallbacks.values())}
        if report.expert_fallbacks:
            results["experts"]["fallbacks_per_bank"] = dict(report.expert_fallbacks)
    if report.removed_experts:
        results["removed_experts"] = dict(report.removed_experts)
    if report.layer_sparsity is not None:
        results["layer_sparsity"] = {"profile": config.sparsity_profile, "per_layer": list(report.layer_sparsity)}
        if report.layer_patterns is not None:
            results["layer_sparsity"]["patterns"] = list(report.layer_patterns)
        print(f"{config.sparsity_profile} profile: layer sparsities {min(report.layer_sparsity):.3f} to "
              f"{max(report.layer_sparsity):.3f}", flush=True)
    what = "channel groups" if config.pattern == "structured" else "Linears"
    if pruner.method.removes_experts:
        what = f"MoE blocks ({sum(map(len, report.removed_experts.values()))} experts removed)"
    if report.expert_matrices:
        what = f"Linears and expert banks ({report.expert_matrices} expert matrices)"
    coverage = (f" (the targeted weights: {report.coverage:.1%} of the decoder layers' weights)"
                if report.coverage is not None else "")
    print(
        f"pruned {len(report.sparsity)} {what} with {config.method} ({config.pattern}) to sparsity "
        f"{results['sparsity']:.4f}{coverage} in {results['prune_seconds']:.1f}s; parameters "
        f"{results['parameters_before']:,} -> {results['parameters_after']:,}",
        flush=True,
    )
    note = report.unhandled_note(pruner.engine.prefix)  # logged as a warning when the plan was made
    if note:
        results["unhandled_note"] = note
    evaluate("after")
    if recovery is not None:
        from optimum_prune.calibration.data import calibration_windows
        from optimum_prune.recovery import recover_lora

        windows = calibration_windows(config.dataset, tokenizer, args.recover_samples, config.seqlen, config.seed + 1,
                                      **config.data_options())
        results["recovery"] = recover_lora(model, windows, recovery, progress=progress)
        print(f"LoRA recovery: {recovery.steps} steps in {results['recovery']['seconds']:.1f}s, training loss "
              f"{results['recovery']['loss_first']:.3f} -> {results['recovery']['loss_last']:.3f}", flush=True)
        evaluate("recovered")
    if args.eval:
        results["eval"] = {"dataset": eval_data, "seqlen": config.seqlen, "max_windows": args.eval_windows}
    if tasks:
        results["zero_shot_settings"] = {"tasks": tasks, "num_fewshot": args.tasks_fewshot, "limit": args.tasks_limit}
    if args.push_to_hub:
        results["hub_repo"] = args.push_to_hub  # named in the model card
    extra = {"pruning_results.json": json.dumps(results, indent=2) + "\n"}
    command = shlex.join([os.path.basename(sys.argv[0]) or "optimum-cli", *sys.argv[1:]])
    out = save_pruned(model, output, config, tokenizer, extra_files=extra, results=results, command=command,
                      base_model=args.model, gguf=args.gguf)
    if pruner.checkpoint is not None:
        pruner.checkpoint.clear()
    print(f"saved to {out}", flush=True)
    if args.push_to_hub:
        from optimum_prune.calibration.distributed import is_main_process
        from optimum_prune.hub import push_folder

        if is_main_process():
            url = push_folder(out, args.push_to_hub, private=True if args.hub_private else None)
            print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({url})", flush=True)
    return 0


class PruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="prune", help="Prune a causal language model (SparseGPT, ALPS, Wanda, FASP, ...).")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser):
        add_prune_arguments(parser)

    def run(self):
        code = run_prune(self.args)
        if code:
            sys.exit(code)


def main(argv=None) -> int:
    """Entry point of ``optimum-prune`` and ``python -m optimum_prune.commands`` (same flags as ``optimum-cli prune``)."""
    parser = argparse.ArgumentParser(prog="optimum-prune", description=PruneCommand.COMMAND.help)
    add_prune_arguments(parser)
    return run_prune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
