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

from optimum_prune.fields import (ACTIVATION_PLACES, CALIBRATION_FORMATS, EXPERT_CALIBRATION, GGUF_TYPES, LOAD_DTYPES,
                                  RECOVERY_METHODS, SERVING_ENGINES, SPARSITY_PROFILES, TEACHER_DTYPES, TEACHER_PLACES)


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
    ("sparsity_profile", "pruning", dict(choices=SPARSITY_PROFILES, help="How the sparsity is spread over the "
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
    ("serve_with", "pruning", dict(choices=SERVING_ENGINES,
                                   help="The engine the output is meant for: prune only what it reads (MLP widths "
                                        "on its grid, attention whole where it keeps every query head); refused "
                                        "before any work where it cannot (docs/deploy.md). Default transformers.")),
    ("expert_calibration", "pruning", dict(choices=EXPERT_CALIBRATION, help="MoE experts: statistics of the tokens "
                                           "routed to each expert (default) or of every token.")),
    ("min_expert_tokens", "pruning", dict(type=int, help="MoE experts with fewer routed tokens are pruned by "
                                                          "magnitude instead (default 16).")),
    ("dataset", "data", dict(help="Hub dataset, local .txt/.json/.jsonl, or packaged:wiki-leads.")),
    ("dataset_config", "data", dict()),
    ("dataset_split", "data", dict()),
    ("text_column", "data", dict()),
    ("messages_column", "data", dict(help="Chat data: the column of conversations, rendered with the chat template "
                                          "(default messages).")),
    ("calibration_format", "data", dict(choices=CALIBRATION_FORMATS, help="auto: conversations when the "
                                        "messages column exists, else text (default); chat: require conversations; "
                                        "text: plain text only.")),
    ("num_calibration_samples", "data", dict(flag="--num-samples", type=int, help="Calibration windows (default 64).")),
    ("seqlen", "data", dict(type=int, help="Tokens per window (default 512).")),
    ("batch_size", "data", dict(type=int, help="Windows per forward pass (default 8).")),
    ("seed", "data", dict(type=int)),
    ("dampening", "data", dict(type=float)),
)


#: flags that name a file, folder or Hub id: an empty value is refused at once
PATH_FLAGS = (("--model", "model"), ("--output", "output"), ("--config", "config"), ("--dataset", "dataset"),
              ("--eval-dataset", "eval_dataset"), ("--recover-dataset", "recover_dataset"),
              ("--checkpoint-dir", "checkpoint_dir"), ("--activation-folder", "activation_folder"), ("--offload-folder", "offload_folder"),
              ("--tasks-include", "tasks_include"), ("--push-to-hub", "push_to_hub"))


def _flag(field: str, options: dict) -> str:
    return options.get("flag", "--" + field.replace("_", "-"))


def _add_config_flags(parser, group: str) -> None:
    """Add the flags of ``CONFIG_FLAGS`` that belong to ``group`` to ``parser`` (an argument group)."""
    for field, where, options in CONFIG_FLAGS:
        if where == group:
            flag = _flag(field, options)
            parser.add_argument(flag, dest=field, default=None, **{k: v for k, v in options.items() if k != "flag"})


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, output, devices and where activations wait."""
    model = parser.add_argument_group("model and output")
    model.add_argument("--model", required=True, help="Hub id, local folder, or packaged:smollm2-135m.")
    model.add_argument("--output", default=None, help="Folder for the pruned checkpoint (must be new or empty); "
                                                      "required unless --dry-run.")
    model.add_argument("--dry-run", action="store_true",
                       help="Print the plan (tasks per target), the estimated peak memory per device and time, "
                            "and exit: only the model's configuration is read, nothing is written.")
    model.add_argument("--overwrite", action="store_true",
                       help="Replace --output if it is a previous optimum-prune output, proven so: nothing in it but the "
                            "files its save wrote (listed in its .optimum-prune-output.json).")
    model.add_argument("--gguf", default=None, choices=GGUF_TYPES,
                       help="Also write a GGUF file of this type into --output for llama.cpp / Ollama / LM Studio "
                            "(Llama, Mistral, Qwen2; checked before the prune).")
    model.add_argument("--push-to-hub", default=None, metavar="REPO",
                       help="After a successful save, upload the output folder to this Hub repo (created if missing).")
    model.add_argument("--hub-private", action="store_true", help="With --push-to-hub: create the repo private.")
    model.add_argument("--dtype", default="auto", choices=LOAD_DTYPES)
    model.add_argument("--device", default=None, help="Compute device for each layer, e.g. cuda:0 (default: where it lives).")
    model.add_argument("--device-map", default=None, help="accelerate device_map for loading, e.g. auto.")
    model.add_argument("--max-memory", default=None,
                       help="With --device-map: memory per device, e.g. '0=20GiB,cpu=60GiB' (the rest is offloaded to disk).")
    model.add_argument("--offload-folder", default=None, help="Where --device-map offloads weights to disk.")
    model.add_argument("--activations", choices=ACTIVATION_PLACES, default="device",
                       help="Where the calibration activations wait between layers: where they were produced "
                            "(default), in CPU memory, or on disk (one file per batch). Same result.")
    model.add_argument("--activation-folder", default=None,
                       help="With --activations disk: folder for those files (default: the system's temp folder).")


def _evaluation_and_recovery_arguments(parser: argparse.ArgumentParser) -> None:
    """Measurements before and after, and the recovery after pruning."""
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
    recovery.add_argument("--recover", choices=RECOVERY_METHODS, default=None,
                          help="lora: a short LoRA fine-tune on the calibration text, merged back; distill: every "
                               "parameter trained to match the dense model's logits (forward KL); distill-lora: the "
                               "same loss through LoRA adapters (less memory). Sparsity masks kept.")
    recovery.add_argument("--recover-steps", type=int, default=100, help="Optimiser steps (default 100).")
    recovery.add_argument("--recover-lr", type=float, default=None,
                          help="Peak learning rate (default 2e-4 for lora and distill-lora, 5e-5 for distill).")
    recovery.add_argument("--recover-rank", type=int, default=8, help="LoRA rank of lora and distill-lora (default 8; alpha = 2 x rank).")
    recovery.add_argument("--recover-batch-size", type=int, default=4, help="Windows of --seqlen tokens per step (default 4).")
    recovery.add_argument("--recover-samples", type=int, default=256,
                          help="Training windows drawn from --recover-dataset or --dataset (seed + 1, default 256).")
    recovery.add_argument("--recover-temperature", type=float, default=None,
                          help="distill, distill-lora: temperature of both softmaxes in the KL (default 1).")
    recovery.add_argument("--recover-ce-weight", type=float, default=None,
                          help="distill, distill-lora: share of the next-token cross-entropy in the loss, 0 to 1 (default 0.5; 0: KL only).")
    recovery.add_argument("--recover-hidden-weight", type=float, default=None,
                          help="distill, distill-lora: weight of the hidden-state term (every layer's output where the depth is "
                               "kept, the final state otherwise; default 0).")
    recovery.add_argument("--recover-teacher", choices=TEACHER_PLACES, default=None,
                          help="distill, distill-lora: where the teacher's weights wait between its forwards (default "
                               "device: beside the model; cpu: host memory; disk: a temporary folder under $TMPDIR, "
                               "removed after the recovery), each module brought to the device for its forward.")
    recovery.add_argument("--recover-teacher-dtype", choices=TEACHER_DTYPES, default=None,
                          help="distill, distill-lora: the teacher's dtype (default: the model's; bfloat16 halves it).")
    recovery.add_argument("--recover-dataset", default=None,
                          help="The recovery's training text when it is not --dataset (a local file, packaged:..., "
                               "a dataset name; drawn like the calibration windows).")

def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
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

    _evaluation_and_recovery_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def flag_fields(args) -> dict:
    """The config fields the flags give explicitly (``--method-kwargs`` parsed, ``--one-pass``)."""
    from optimum_prune.errors import PruningError

    fields = {field: getattr(args, field) for field, _, _ in CONFIG_FLAGS if getattr(args, field) is not None}
    if args.one_pass:
        fields["sequential"] = False
    if args.method_kwargs is not None:
        try:
            fields["method_kwargs"] = json.loads(args.method_kwargs)
        except json.JSONDecodeError as err:
            raise PruningError(f"--method-kwargs must be a JSON object ({err}), e.g. '{{\"blocksize\": 64}}'.") from None
        except RecursionError:
            raise PruningError("--method-kwargs is nested too deeply to read; give a flat JSON object of method "
                               "options, e.g. '{\"blocksize\": 64}'.") from None
    return fields


def check_flags(args) -> None:
    """Every check of the flags that needs neither torch nor a file: answered in a fraction of a
    second (`optimum_prune.fields.check_plain_fields` is also what the config checks)."""
    from optimum_prune.errors import PruningError
    from optimum_prune.fields import check_plain_fields

    for flag, value in ((flag, getattr(args, dest)) for flag, dest in PATH_FLAGS):
        if value is not None and not value.strip():
            raise PruningError(f"{flag} is empty; give a path (or leave the flag out).")
    fields = flag_fields(args)
    check_plain_fields(fields if args.config else {"pattern": "unstructured", **fields})
    if args.output is None and not args.dry_run:
        raise PruningError("--output FOLDER is required: where the pruned checkpoint goes (--dry-run needs none).")
    if args.hub_private and not args.push_to_hub:
        raise PruningError("--hub-private needs --push-to-hub REPO.")
    if args.recover_dataset is not None and not args.recover:
        raise PruningError("--recover-dataset needs --recover lora or --recover distill.")
    for flag in DISTILL_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None and args.recover not in ("distill", "distill-lora"):
            raise PruningError(f"{flag} needs --recover distill or distill-lora.")
    if args.push_to_hub:
        from optimum_prune.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    if (args.max_memory or args.offload_folder) and not args.device_map:
        raise PruningError("--max-memory and --offload-folder need --device-map (e.g. auto).")
    if args.max_memory:
        _max_memory(args.max_memory)


def build_config(args):
    """PruningConfig from --config plus the flags given explicitly."""
    from optimum_prune.configuration import PruningConfig

    base = PruningConfig.from_pretrained(args.config).to_dict() if args.config else {}
    for key in ("format_version", "optimum_prune_version"):
        base.pop(key, None)
    if args.pattern is not None and args.sparsity is None and args.config:
        base.pop("sparsity", None)  # a new pattern brings its own default sparsity
    base.update(flag_fields(args))
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
    from optimum_prune.engine.checkpoint import LayerCheckpoint

    state = LayerCheckpoint(args.checkpoint_dir).state_path if args.checkpoint_dir else None  # this process's
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


def _local_inputs(args, config) -> list[tuple[str, str | None]]:
    """(description, path) of what the run reads, where it is a local path."""
    return [("the model", args.model), ("the calibration data", config.dataset), ("--config", args.config),
            ("--eval-dataset", args.eval_dataset), ("--recover-dataset", args.recover_dataset),
            ("--tasks-include", args.tasks_include)]


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
    from optimum_prune.engine.checkpoint import LayerCheckpoint
    from optimum_prune.runtime.distributed import is_main_process

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
    check_flags(args)  # before torch is imported

    from optimum_prune.errors import PruningError
    from optimum_prune.runtime.distributed import init_from_env

    config = build_config(args)
    pruner, output, evaluation, recovery = check_run(args, config)
    if args.dry_run:  # under torchrun every process plans; the first one prints
        plan = pruner.plan(args.model, device=args.device, dtype=args.dtype, checkpoint=args.checkpoint_dir is not None,
                           recovery=recovery)
        if os.environ.get("RANK", "0") == "0":
            print(plan.describe(), flush=True)
        return 0
    if args.no_progress:  # also the bars of transformers (loading, saving) and datasets (reading files)
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    if init_from_env(args.device) and evaluation.tasks:  # torchrun / accelerate launch (recovery is data-parallel)
        raise PruningError("--tasks runs in one process only; evaluate the saved model in a separate single-process "
                           "run.")
    checkpoint = reserve_paths(args, output)
    try:
        pruner.run(args.model, output, evaluation=evaluation, recovery=recovery, gguf=args.gguf,
                   push_to_hub=args.push_to_hub, private=True if args.hub_private else None, command=_command(),
                   dtype=args.dtype, device_map=args.device_map, load_kwargs=_load_kwargs(args), echo=_echo,
                   device=args.device, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                   resume=args.resume, check_memory=not args.skip_memory_check, activations=args.activations,
                   activation_folder=args.activation_folder)
        return 0
    finally:
        if checkpoint is not None:
            checkpoint.release()
        output.release()


def check_run(args, config):
    """Every check a run makes before its work, the same for ``--dry-run`` (which then prints the
    plan) and the real run (which then loads the model): paths, evaluation and recovery flags, the
    method's arguments, the device, and the model's ``config.json`` against the sequence length and
    the serving engine. Returns the `Pruner`, the (unreserved) `OutputFolder` or None, the
    `Evaluation` and the `Recovery`."""
    from optimum_prune.pruner import Pruner

    output = check_paths(args, config)
    evaluation, recovery = _evaluation(args, config), _recovery(args, config)
    pruner = Pruner(config)
    pruner.check_arguments(config.dataset, args.checkpoint_dir, args.resume, args.activations, args.activation_folder,
                           device=args.device)
    _check_model_config(args, pruner, evaluation, recovery)
    return pruner, output, evaluation, recovery


def _echo(line: str) -> None:
    print(line, flush=True)


def _command() -> str:
    import shlex

    return shlex.join([os.path.basename(sys.argv[0]) or "optimum-cli", *sys.argv[1:]])


def _load_kwargs(args) -> dict:
    found = {}
    if args.max_memory:
        found["max_memory"] = _max_memory(args.max_memory)
    if args.offload_folder:
        found["offload_folder"] = args.offload_folder
    return found


def _evaluation(args, config):
    """--eval / --eval-dataset / --tasks as an `Evaluation` (held-out text by default for the
    packaged calibration text)."""
    from optimum_prune.workflow import Evaluation

    dataset = args.eval_dataset if args.eval else None
    if args.eval and dataset is None:
        if config.dataset != "packaged:wiki-leads":
            from optimum_prune.errors import PruningError

            raise PruningError("--eval needs --eval-dataset (held-out text: a local file, or packaged:wiki-leads-eval).")
        dataset = "packaged:wiki-leads-eval"
    return Evaluation(dataset=dataset, windows=args.eval_windows, tasks=args.tasks, tasks_limit=args.tasks_limit,
                      tasks_fewshot=args.tasks_fewshot, tasks_include=args.tasks_include,
                      tasks_batch_size=args.tasks_batch_size)


#: The flags that set the distillation's loss and teacher (refused with --recover lora).
DISTILL_FLAGS = ("--recover-temperature", "--recover-ce-weight", "--recover-hidden-weight", "--recover-teacher",
                 "--recover-teacher-dtype")


def _recovery(args, config):
    """--recover lora / distill and its flags as a `Recovery` (None without --recover)."""
    if not args.recover:
        return None
    from optimum_prune.recovery import DistillConfig, LoraRecoveryConfig
    from optimum_prune.workflow import Recovery

    lr = {} if args.recover_lr is None else {"lr": args.recover_lr}
    if args.recover in ("distill", "distill-lora"):  # an interrupted one continues from the checkpoint folder (--resume)
        loss = {field: value for field, value in (("temperature", args.recover_temperature),
                                                  ("ce_weight", args.recover_ce_weight),
                                                  ("hidden_weight", args.recover_hidden_weight)) if value is not None}
        if args.recover == "distill-lora":  # adapters instead of every parameter, at LoRA's learning rate
            loss.update(lora_rank=args.recover_rank, lora_alpha=2 * args.recover_rank)
            lr = lr or {"lr": LoraRecoveryConfig.lr}
        distill = DistillConfig(steps=args.recover_steps, batch_size=args.recover_batch_size, seed=config.seed,
                                **lr, **loss)
        return Recovery(samples=args.recover_samples, distill=distill, checkpoint_dir=args.checkpoint_dir,
                        dataset=args.recover_dataset, teacher_place=args.recover_teacher or "device",
                        teacher_dtype=args.recover_teacher_dtype)
    lora = LoraRecoveryConfig(steps=args.recover_steps, rank=args.recover_rank, alpha=2 * args.recover_rank,
                              batch_size=args.recover_batch_size, seed=config.seed, **lr)
    return Recovery(lora, samples=args.recover_samples, dataset=args.recover_dataset)


def _check_model_config(args, pruner, evaluation, recovery) -> None:
    """The model's ``config.json`` (read alone, before the weights): windows of --seqlen fit its
    positions where anything runs them, and --serve-with / --gguf can take its output."""
    from optimum_prune.pruner import load_model_config

    model_config = load_model_config(args.model)
    pruner.check_windows_fit(model_config, evaluation, recovery)
    if pruner.config.serve_with != "transformers" or args.gguf is not None:
        pruner.check_serving(model_config.to_dict(), gguf=args.gguf)


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
