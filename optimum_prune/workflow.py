"""The pieces of a whole prune run that `Pruner.run` strings together: what is evaluated before
and after (`Evaluation`), what recovers the pruned model (`Recovery`), and the results a run
records (``pruning_results.json``, the model card) and prints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from .errors import PruningError, check_positive_int
from .fields import TEACHER_DTYPES, TEACHER_PLACES
from .model_card import declined_text


@dataclass
class Evaluation:
    """What is measured before pruning, after it and after recovery: perplexity on ``dataset``
    (``windows`` non-overlapping windows of the config's ``seqlen``; None: none) and lm-eval
    ``tasks`` (None: none)."""

    dataset: str | None = None
    windows: int = 64
    tasks: list[str] | None = None
    tasks_limit: float | None = None  # documents per task (>= 1) or a fraction (< 1)
    tasks_fewshot: int = 0
    tasks_include: str | None = None
    tasks_batch_size: int = 8

    def __post_init__(self):
        check_positive_int(self.windows, "--eval-windows")
        if self.tasks_limit is not None and not self.tasks_limit > 0:
            raise PruningError("--tasks-limit must be a positive count or fraction.")
        if self.tasks_fewshot < 0 or self.tasks_batch_size < 1:
            raise PruningError("--tasks-fewshot must be >= 0 and --tasks-batch-size >= 1.")
        if self.tasks:
            import importlib.util

            from .evaluation.zero_shot import parse_tasks

            self.tasks = parse_tasks(self.tasks)
            if importlib.util.find_spec("lm_eval") is None:
                raise PruningError("--tasks needs lm-eval: pip install 'optimum-prune[eval]' (or lm-eval).")

    @property
    def limit(self):
        return None if self.tasks_limit is None else (int(self.tasks_limit) if self.tasks_limit >= 1 else self.tasks_limit)

    def measure(self, stage: str, model, tokenizer, config, results: dict, echo: Callable[[str], None],
                progress: bool = True) -> None:
        """Record the measurements of ``stage`` (before, after, recovered) in ``results``."""
        if self.dataset is not None:
            from .evaluation.perplexity import perplexity

            value = perplexity(model, tokenizer, self.dataset, seqlen=config.seqlen, max_windows=self.windows,
                               progress=progress)
            results[f"perplexity_{stage}"] = value
            echo(f"perplexity {stage}: {value:.3f}")
        if self.tasks:
            from .evaluation.zero_shot import zero_shot

            results[f"zero_shot_{stage}"] = zero_shot(
                model, tokenizer, self.tasks, num_fewshot=self.tasks_fewshot, limit=self.limit,
                batch_size=self.tasks_batch_size, include_path=self.tasks_include, seed=config.seed)
            echo(f"zero-shot {stage}: {json.dumps(results[f'zero_shot_{stage}'])}")

    def settings(self, config) -> dict:
        """What the results record of the evaluation itself."""
        found = {}
        if self.dataset is not None:
            found["eval"] = {"dataset": self.dataset, "seqlen": config.seqlen, "max_windows": self.windows}
        if self.tasks:
            found["zero_shot_settings"] = {"tasks": self.tasks, "num_fewshot": self.tasks_fewshot,
                                           "limit": self.tasks_limit}
        return found


@dataclass
class Recovery:
    """Recovery after pruning on ``samples`` windows of the calibration source, drawn with the
    config's seed + 1: a short LoRA fine-tune (`optimum_prune.recovery.recover_lora`, ``lora``: its
    settings), or — with ``distill`` (a `DistillConfig`) — distillation of every parameter from
    the dense model the prune started from (`optimum_prune.recovery.recover_distill`; the teacher is
    a copy of the loaded model taken before the prune, in ``teacher_dtype`` when given, its weights
    on the model's device, in host memory or on disk as ``teacher_place`` says).
    ``checkpoint_dir``: where an interrupted distillation is saved and continued from. ``dataset``:
    the training text when it is not the calibration source (any source calibration takes: a local
    file, ``packaged:...``, a dataset name), drawn the same way."""

    lora: object = None  # a LoraRecoveryConfig (default: its defaults)
    samples: int = 256
    distill: object = None  # a DistillConfig: distillation instead of LoRA
    teacher_dtype: str | None = None
    teacher_place: str = "device"  # device, cpu or disk: where the teacher's weights wait between its forwards
    teacher_folder: str | None = None  # with "disk": where its temporary folder goes (default: the system's)
    checkpoint_dir: str | None = None
    dataset: str | None = None  # the training text (default: the config's calibration dataset)

    def __post_init__(self):
        check_positive_int(self.samples, "--recover-samples")
        if self.teacher_place not in TEACHER_PLACES:
            raise PruningError(f"--recover-teacher must be one of {', '.join(TEACHER_PLACES)}, got {self.teacher_place!r}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise PruningError(f"--recover-teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got "
                               f"{self.teacher_dtype!r}.")
        if self.dataset is not None:  # a missing local file is refused now, not after hours of pruning
            from .paths import looks_local, missing_local

            if not isinstance(self.dataset, str) or not self.dataset.strip():
                raise PruningError("--recover-dataset must name a file, packaged:... text or a dataset.")
            if not os.path.exists(self.dataset) and looks_local(self.dataset, suffixes=(".txt", ".json", ".jsonl")):
                raise PruningError(f"--recover-dataset: {missing_local(self.dataset)}; give a .txt/.json/.jsonl file, "
                                   f"packaged:wiki-leads or a dataset name.")
        if self.lora is None and self.distill is None:
            from .recovery import LoraRecoveryConfig

            self.lora = LoraRecoveryConfig()

    def check_fits(self, model, seqlen: int, processes: int = 1) -> None:
        """Before any work: the batches can be shared by ``processes`` and the training fits in the
        free memory of the model's device (one `PruningError` line otherwise)."""
        from .recovery.memory import check_training_memory

        self.check_processes(processes)
        check_training_memory(model, self, seqlen, processes)

    def check_processes(self, processes: int) -> None:
        """Data-parallel training shares every batch's windows between the processes: refuse, before
        any work, fewer windows per step than processes."""
        settings = self.distill if self.distill is not None else self.lora
        if processes > min(settings.batch_size, self.samples):
            raise PruningError(f"A recovery batch of {min(settings.batch_size, self.samples)} windows cannot be shared "
                               f"by {processes} processes; use at least as many windows per step "
                               f"(--recover-batch-size) as processes.")

    def teacher_of(self, model):
        """The teacher distillation needs (a frozen copy of ``model`` before it is pruned, in
        ``teacher_dtype``, its weights where ``teacher_place`` says: `runtime.offload.offloaded_copy`;
        ``"disk"`` writes them to a new temporary folder under ``teacher_folder``, removed with the
        teacher), or None (LoRA, or plain fine-tuning: ``DistillConfig(ce_weight=1)``)."""
        if self.distill is None or not self.distill.needs_teacher:
            return None
        import shutil
        import tempfile
        import weakref

        import torch

        from .runtime.offload import offloaded_copy

        dtype = getattr(torch, self.teacher_dtype) if self.teacher_dtype is not None else None
        folder = None
        if self.teacher_place == "disk":
            if self.teacher_folder is not None:
                os.makedirs(self.teacher_folder, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="optimum-prune-teacher-", dir=self.teacher_folder)
        try:
            teacher = offloaded_copy(model, self.teacher_place, dtype, folder)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if folder is not None:  # the folder this run made goes after the recovery, with the teacher or at exit
            self.teacher_cleanup = weakref.finalize(teacher, shutil.rmtree, folder, ignore_errors=True)
        return teacher

    def apply(self, model, tokenizer, config, echo: Callable[[str], None], progress: bool = True,
              teacher=None) -> dict:
        from .calibration.data import calibration_windows
        from .recovery import loss_is_kl, recover_distill, recover_lora

        windows = calibration_windows(self.dataset or config.dataset, tokenizer, self.samples, config.seqlen,
                                      config.seed + 1, **config.data_options())
        if self.distill is not None:
            if teacher is None and self.distill.needs_teacher:
                raise PruningError("Distillation needs the dense model as teacher: take it with teacher_of(model) "
                                   "before the prune.")
            found = recover_distill(model, teacher, windows, self.distill, progress=progress,
                                    checkpoint_dir=self.checkpoint_dir)
            if getattr(self, "teacher_cleanup", None) is not None:
                self.teacher_cleanup()  # the teacher's disk folder, no longer read
            found.update(dataset=self.dataset or config.dataset, teacher_place=self.teacher_place,
                         teacher_dtype=self.teacher_dtype)
            loss = "KL to the dense model" if loss_is_kl(self.distill) else "training loss"
            echo(f"distillation: {self.distill.steps} steps ({found['tokens']:,} tokens) in {found['seconds']:.1f}s, "
                 f"{loss} {found['loss_first']:.4f} -> {found['loss_last']:.4f}")
            return found
        found = recover_lora(model, windows, self.lora, progress=progress)
        found["dataset"] = self.dataset or config.dataset
        echo(f"LoRA recovery: {self.lora.steps} steps in {found['seconds']:.1f}s, training loss "
             f"{found['loss_first']:.3f} -> {found['loss_last']:.3f}")
        return found


def report_results(report, config, method) -> dict:
    """What a run records of its prune (``report``, a `PruneReport`)."""
    results = {"sparsity": report.overall_sparsity}
    if report.coverage is not None:
        results["coverage"] = report.coverage
    if report.unhandled:
        results["unhandled_weights"] = dict(report.unhandled)
    if report.routers:
        results["router_weights"] = dict(report.routers)  # left dense on purpose
    if report.ignored:
        results["ignored_weights"] = dict(report.ignored)  # left dense by targets / ignore
    if report.expert_matrices:
        results["experts"] = {"matrices": report.expert_matrices, "calibration": config.expert_calibration,
                              "min_tokens": config.min_expert_tokens,
                              "magnitude_fallbacks": sum(report.expert_fallbacks.values())}
        if report.expert_fallbacks:
            results["experts"]["fallbacks_per_bank"] = dict(report.expert_fallbacks)
    if report.removed_experts:
        results["removed_experts"] = dict(report.removed_experts)
    if report.layer_influence is not None:
        results["removed_layers"] = list(report.removed_layers)
        results["layer_influence"] = list(report.layer_influence)
        if report.block_influence:
            results["block_influence"] = {kind: list(values) for kind, values in report.block_influence.items()}
        if report.removed_blocks:
            results["removed_blocks"] = list(report.removed_blocks)
        if report.unit_scores:
            results["unit_scores"] = dict(report.unit_scores)
    if report.declined_refits:
        results["declined_refits"] = dict(report.declined_refits)
    if report.layer_sparsity is not None:
        results["layer_sparsity"] = {"profile": config.sparsity_profile, "per_layer": list(report.layer_sparsity)}
        if report.layer_patterns is not None:
            results["layer_sparsity"]["patterns"] = list(report.layer_patterns)
    return results


def summary_lines(report, config, method, results: dict) -> list[str]:
    """The lines a run prints once the prune is done."""
    lines = []
    if report.layer_sparsity is not None:
        lines.append(f"{config.sparsity_profile} profile: layer sparsities {min(report.layer_sparsity):.3f} to "
                     f"{max(report.layer_sparsity):.3f}")
    what = "channel groups" if config.pattern == "structured" else "Linears"
    if method.removes_experts:
        what = f"MoE blocks ({sum(map(len, report.removed_experts.values()))} experts removed)"
    if method.removes_layers:
        what = f"decoder layers ({len(report.removed_layers)} removed: {report.removed_layers})"
        if report.removed_blocks:
            what += f" and blocks ({len(report.removed_blocks)} left out: {', '.join(report.removed_blocks)})"
    if report.expert_matrices:
        what = f"Linears and expert banks ({report.expert_matrices} expert matrices)"
    coverage = (f" (the targeted weights: {report.coverage:.1%} of the decoder layers' weights)"
                if report.coverage is not None else "")
    lines.append(f"pruned {len(report.sparsity)} {what} with {config.method} ({config.pattern}) to sparsity "
                 f"{results['sparsity']:.4f}{coverage} in {results['prune_seconds']:.1f}s; parameters "
                 f"{results['parameters_before']:,} -> {results['parameters_after']:,}")
    if report.declined_refits:
        lines.append(f"{len(report.declined_refits)} consumers kept their kept columns (least-squares re-fit over "
                     f"max_restore_growth): {declined_text(report.declined_refits)}")
    return lines
