"""`Pruner`: config + model + calibration data -> pruned model (and a checkpoint that loads anywhere)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from torch import nn

from .engine.checkpoint import LayerCheckpoint
from .calibration.data import calibration_windows, check_seqlen
from .runtime.distributed import is_distributed, is_main_process, shard_windows, world_size
from .engine.activations import check_place
from .engine.build import build_engine
from .engine.layerwise import LayerwiseEngine
from .runtime.offload import check_device, check_materialized, input_device
from .engine.report import PruneReport
from .engine.tasks import TASK_KINDS
from .engine.cost import chunk_plan, estimate_phases, gemm_rate, solve_share
from .engine.resources import PrunePlan, estimate_memory, expert_chunk, profile_bytes, resident_bytes, working_budget
from .configuration import PruningConfig
from .errors import PruningError, first_line
from .hub import check_repo_id, push_folder
from .output import OutputFolder, check_free_space, preflight
from .paths import looks_local, missing_local
from .recovery.memory import training_memory
from .registry import get_method
from .workflow import Evaluation, Recovery, report_results, summary_lines


logger = logging.getLogger(__name__)


def load_model(model_id: str | os.PathLike, dtype="auto", device_map=None, **kwargs):
    """Load a causal LM (and its tokenizer) from a hub id, a local folder or ``packaged:smollm2-135m``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = resolve_model_id(model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, device_map=device_map, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as bad input, in one line
        hint = "" if isinstance(err, OSError) else " (is config.json consistent with the weight files? re-download or re-save the model)"
        raise PruningError(f"Could not load model {model_id!r}: {first_line(err)}{hint}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def resolve_model_id(model_id: str | os.PathLike) -> str:
    """A hub id, a local folder (which must exist) or ``packaged:smollm2-135m`` as the path or id
    ``from_pretrained`` takes."""
    from .assets import PACKAGED_PREFIX, resolve_packaged_model

    model_id = os.fspath(model_id)
    if model_id.startswith(PACKAGED_PREFIX):
        return resolve_packaged_model(model_id)
    if os.path.isdir(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id)
    if looks_local(model_id):
        raise PruningError(f"Model folder {missing_local(model_id)}; give a local folder or a Hub id (org/name).")
    return model_id


def load_model_config(model_id: str | os.PathLike):
    """The transformers configuration of ``model_id`` (its ``config.json`` alone)."""
    from transformers import AutoConfig

    model_id = resolve_model_id(model_id)
    try:
        return AutoConfig.from_pretrained(model_id)
    except Exception as err:  # noqa: BLE001 - reported as bad input, in one line
        raise PruningError(f"Could not read the configuration of model {model_id!r}: {first_line(err)}") from None


def load_empty_model(model_id: str | os.PathLike, dtype="auto"):
    """The causal LM ``model_id`` describes, built from its ``config.json`` alone with every weight on
    the meta device (nothing is read or allocated): what a plan-only run looks at."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(model_id)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


class Pruner:
    """Applies a `PruningConfig` to a model.

    Example::

        pruner = Pruner.from_config(PruningConfig(method="sparsegpt", sparsity=0.5))
        model = pruner.prune("HuggingFaceTB/SmolLM2-135M", calibration_data=["some text", ...])
        pruner.save_pretrained("out")
    """

    def __init__(self, config: PruningConfig | dict | None = None, **kwargs):
        if config is None:
            config = PruningConfig(**kwargs)
        elif isinstance(config, dict):
            config = PruningConfig.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("Pass either a PruningConfig or keyword arguments, not both.")
        if not isinstance(config, PruningConfig):
            raise PruningError(f"Pruner needs a PruningConfig, got {type(config).__name__}.")
        self.config = config
        method_cls = get_method(config.method)
        self.method = method_cls(config.method_options, dampening=config.dampening)
        self.model = None
        self.tokenizer = None
        self.report: PruneReport | None = None
        self.checkpoint: LayerCheckpoint | None = None
        self.saved_to: str | None = None  # the folder of the last successful save_pretrained
        self.engine = None  # the engine of the last prune (its plan, its history for global methods)

    @classmethod
    def from_config(cls, config: PruningConfig | dict) -> "Pruner":
        return cls(config)

    def prune(
        self,
        model: nn.Module | str | os.PathLike,
        calibration_data=None,
        tokenizer=None,
        device: str | torch.device | None = None,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        check_memory: bool = True,
        activations: str = "device",
        activation_folder: str | os.PathLike | None = None,
    ) -> nn.Module:
        """Prune ``model`` in place and return it.

        Args:
            model: a loaded ``PreTrainedModel`` (possibly dispatched by accelerate) or a hub id / path.
            calibration_data: texts, a ``datasets.Dataset``, token ids, a local file or a dataset
                name; defaults to ``config.dataset``. Not needed by data-free methods (magnitude).
            tokenizer: needed for text data when ``model`` is an object; loaded with it otherwise.
            device: compute device for each layer (default: where the layer lives).
            checkpoint_dir: commit every finished decoder layer there (`LayerCheckpoint`), so that
                an interrupted prune can continue with ``resume=True``. The folder is left in place
                (``self.checkpoint.clear()`` deletes it once the model is saved).
            resume: continue the interrupted prune found in ``checkpoint_dir`` (same model, config
                and calibration data, else a `PruningError`); gives the weights an uninterrupted
                run gives.
            check_memory: before touching the model, estimate the memory one layer needs
                (`optimum_prune.engine.resources`) and raise `PruningError` with the numbers
                when a device cannot hold it; a mixture of experts whose statistics do not fit in
                the free memory is calibrated in expert chunks (several passes per MoE layer, the
                same weights). Without the check: one pass.
            activations: where the calibration activations wait between decoder layers: ``"device"``
                (where produced), ``"cpu"``, or ``"disk"`` (one file per batch), same result either way.
            activation_folder: with ``activations="disk"``, the folder for those files (default: the
                system's temporary folder); they are deleted as the prune goes.
        """
        cfg = self.config
        self.check_arguments(calibration_data, checkpoint_dir, resume, activations, activation_folder, device)
        model, tokenizer = self._model_to_prune(model, tokenizer)
        self.checkpoint = None
        engine = build_engine(model, cfg, self.method, device=device, progress=progress, activations=activations,
                              activation_folder=activation_folder)
        windows = self._windows(model, calibration_data, tokenizer, engine, checkpoint_dir)
        engine.prepare(windows)  # on the dense model, before any change
        if check_memory:
            engine.check_memory(0 if windows is None else windows.shape[0], cfg.seqlen, input_device(model),
                                checkpoint=checkpoint_dir is not None)
        self.report = self._run_engine(engine, windows, checkpoint_dir, resume)
        self.engine = engine
        if getattr(model, "config", None) is not None:
            model.config.pruning_config = cfg.to_dict()
        self.model, self.tokenizer = model, tokenizer
        logger.info("Pruned %d targets to %.4f sparsity in %.1fs", len(self.report.sparsity),
                    self.report.overall_sparsity, self.report.seconds)
        return model

    def _model_to_prune(self, model, tokenizer):
        """``model`` (an object, or loaded from a hub id / path) checked: a module, its weights
        materialised, its output servable by ``config.serve_with``; and its tokenizer."""
        if isinstance(model, (str, os.PathLike)):
            model, loaded_tokenizer = load_model(model)
            tokenizer = tokenizer or loaded_tokenizer
        if not isinstance(model, nn.Module):
            raise PruningError(f"model must be a PreTrainedModel or a hub id / path, got {type(model).__name__}.")
        check_materialized(model)
        if getattr(model, "config", None) is not None:
            self.check_serving(model.config.to_dict())
        return model, tokenizer

    def run(self, model: str | os.PathLike, output, *, evaluation: Evaluation | None = None,
            recovery: Recovery | None = None, gguf: str | None = None, push_to_hub: str | None = None,
            private: bool | None = None, command: str | None = None, dtype="auto", device_map=None,
            load_kwargs: dict | None = None, echo=None, **prune_kwargs) -> dict:
        """The whole workflow: load ``model`` (a Hub id, folder or ``packaged:...``), measure it
        (``evaluation``), prune it (``prune_kwargs``: `prune`'s keyword arguments), recover it
        (``recovery``) and measure it again, save it into ``output`` (a folder, or an `OutputFolder`
        reserved beforehand) with ``pruning_results.json`` and the card, optionally with a GGUF file,
        and upload it to ``push_to_hub``. ``echo`` receives one line per step (default: the log).
        Returns the results (what ``pruning_results.json`` holds)."""
        echo = echo or logger.info
        evaluation, progress = evaluation or Evaluation(), prune_kwargs.get("progress", True)
        if load_kwargs and not device_map:
            raise PruningError("--max-memory and --offload-folder need --device-map (e.g. auto).")
        if push_to_hub:
            check_repo_id(push_to_hub)
        if recovery is not None and recovery.dataset is None and self.config.dataset is None:
            raise PruningError("--recover trains on text from --dataset or --recover-dataset; pass one of them.")
        loaded, tokenizer = load_model(model, dtype=dtype, device_map=device_map, **(load_kwargs or {}))
        if is_main_process():  # the writer: the output's disk holds the model, before hours of work
            check_free_space(getattr(output, "path", output), saved_bytes(loaded, gguf))
        self.check_windows_fit(getattr(loaded, "config", None), evaluation, recovery)
        if recovery is not None:  # before any work: the training after the prune must fit too
            recovery.check_fits(loaded, self.config.seqlen, world_size())
        results = {}
        evaluation.measure("before", loaded, tokenizer, self.config, results, echo, progress)
        results["parameters_before"] = sum(p.numel() for p in loaded.parameters())
        teacher = recovery.teacher_of(loaded) if recovery is not None else None  # the dense model, for distillation
        start = time.perf_counter()
        self.prune(loaded, tokenizer=tokenizer, **prune_kwargs)
        results["prune_seconds"] = time.perf_counter() - start
        results.update(report_results(self.report, self.config, self.method))
        results["parameters_after"] = sum(p.numel() for p in loaded.parameters())
        for line in summary_lines(self.report, self.config, self.method, results):
            echo(line)
        note = self.report.unhandled_note(self.engine.prefix)  # logged as a warning when the plan was made
        if note:
            results["unhandled_note"] = note
        left_out = self.report.left_out_note(self.engine.prefix)
        if left_out:
            results["left_out_note"] = left_out
            echo(left_out)
        evaluation.measure("after", loaded, tokenizer, self.config, results, echo, progress)
        if recovery is not None:
            results["recovery"] = recovery.apply(loaded, tokenizer, self.config, echo, progress, teacher=teacher)
            teacher = None
            evaluation.measure("recovered", loaded, tokenizer, self.config, results, echo, progress)
        results.update(evaluation.settings(self.config))
        if push_to_hub:
            results["hub_repo"] = push_to_hub  # named in the model card
        extra = {"pruning_results.json": json.dumps(results, indent=2) + "\n"}
        saved = self.save_pretrained(output, extra_files=extra, results=results, command=command,
                                     base_model=os.fspath(model), gguf=gguf)
        if self.checkpoint is not None:
            self.checkpoint.clear()
        echo(f"saved to {saved}")
        url = self.push_to_hub(push_to_hub, private=private) if push_to_hub else None
        if url is not None:
            echo(f"uploaded to https://huggingface.co/{push_to_hub} ({url})")
        return results

    def _windows(self, model, calibration_data, tokenizer, engine, checkpoint_dir) -> torch.Tensor | None:
        """The calibration windows of the config (None for a method without calibration); under
        several processes, this process's share of them."""
        cfg, windows = self.config, None
        if self.method.needs_calibration:
            data = calibration_data if calibration_data is not None else cfg.dataset
            check_seqlen(getattr(model, "config", None), cfg.seqlen)
            windows = calibration_windows(data, tokenizer, cfg.num_calibration_samples, cfg.seqlen, cfg.seed,
                                          **cfg.data_options())
        if not is_distributed():
            return windows
        if not engine.supports_processes:
            raise PruningError(f"Method {cfg.method!r} does not run in several processes yet; run it in one.")
        return shard_windows(windows)  # each process calibrates on its share of the windows

    def _run_engine(self, engine, windows, checkpoint_dir, resume: bool) -> PruneReport:
        """``engine.run``, committing every layer to a checkpoint in ``checkpoint_dir`` if given."""
        if checkpoint_dir is None:
            return engine.run(windows)
        self.checkpoint = LayerCheckpoint(checkpoint_dir, resume=resume)
        try:
            return engine.run(windows, checkpoint=self.checkpoint)
        finally:
            self.checkpoint.release()

    def plan(self, model: nn.Module | str | os.PathLike, num_windows: int | None = None,
             device: str | torch.device | None = None, dtype="auto", checkpoint: bool = False,
             processes: int | None = None, recovery: Recovery | None = None) -> PrunePlan:
        """What `prune` would do with ``model`` and what it would cost, without touching a weight:
        the tasks per target, the estimated peak memory per device (what is held before the prune
        plus the prune's own working set, `engine.resources`) and the estimated time (the
        operations of each phase over the compute device's measured matmul rate, `engine.cost`).

        ``model``: a loaded model (left as it is), or a hub id / folder, of which only the
        configuration is read (weights on the meta device, counted where they would be loaded: the
        CPU). ``num_windows``: calibration windows (default ``config.num_calibration_samples``).
        ``checkpoint``: the prune will commit every layer to a checkpoint (``checkpoint_dir``).
        ``processes``: how many processes will share the prune (default: ``WORLD_SIZE`` of torchrun /
        accelerate launch, else 1): the busiest one's windows and share of the solves. MoE statistics
        that do not fit in the free memory beside the weights are planned in expert chunks.
        ``recovery``: the `Recovery` after the prune, whose training is planned too (its peak, and a
        distillation teacher held through the prune: `recovery.memory`).
        """
        cfg = self.config
        if self.method.is_global:
            raise PruningError(f"Method {cfg.method!r} optimises the whole model at once; plan-only runs cover the "
                               f"layer-wise methods.")
        if isinstance(model, (str, os.PathLike)):
            model = load_empty_model(model, dtype)
        engine = LayerwiseEngine(model, cfg, self.method, device=check_device(device), progress=False)
        windows = cfg.num_calibration_samples if num_windows is None else num_windows
        calibrated = windows if self.method.needs_calibration else 0  # windows the prune runs
        home = torch.device("cpu")
        compute = engine.compute_device(engine.layers[0])  # never meta: the CPU for meta weights
        source = input_device(model)
        source = home if source.type == "meta" else source
        processes = processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
        budget = working_budget(engine, source, home)
        engine.expert_chunk = expert_chunk(engine, calibrated, cfg.seqlen, source, budget, home, checkpoint)
        share = solve_share(engine, processes)  # the busiest process's share of the solves (built once)
        tasks, targets = {kind.label: 0 for kind in TASK_KINDS}, {}
        for entry in engine.plan:
            for task in entry:
                tasks[task.label] = tasks.get(task.label, 0) + 1
                targets[task.target_key()] = targets.get(task.target_key(), 0) + 1
        working = estimate_memory(engine, calibrated, cfg.seqlen, source, home, checkpoint=checkpoint)
        training = training_memory(model, recovery, cfg.seqlen, processes) if recovery is not None else {}
        if training.get("teacher"):  # the dense copy distillation takes before the prune
            working.add(home if source.type == "meta" else source, "distillation teacher", training["teacher"])
        return PrunePlan(
            method=cfg.method, pattern=str(cfg.parsed_pattern), layers=len(engine.layers), tasks=tasks, targets=targets,
            working=working, recovery={str(source): training} if training else {},
            recovery_kind="distillation" if recovery is not None and recovery.distill is not None else "LoRA recovery",
            resident=resident_bytes(model, home), flops=estimate_phases(engine, windows, cfg.seqlen, processes, share),
            rate=gemm_rate(compute), tokens=calibrated * cfg.seqlen, processes=processes,
            solve_share=share, expert_chunk=chunk_plan(engine),
            profile={str(source): profile_bytes(cfg, getattr(model, "config", None), len(engine.layers),
                                                next(engine.layers[0].parameters()).element_size(), calibrated)})

    def check_serving(self, model_config: dict, gguf: str | None = None) -> None:
        """Refuse, before any work, a prune whose output the engine of ``config.serve_with`` (or
        llama.cpp, when a ``gguf`` file will be written) could not run (`export.engines.check_servable`).
        ``model_config``: the model's ``config.json`` as a dict."""
        from .export.engines import check_servable
        from .export.gguf import check_gguf_type, gguf_refusal

        cfg = self.config
        check_servable(cfg.serve_with, model_config, cfg.per_layer_widths(type(self.method)), cfg.pattern == "structured")
        if gguf is not None:
            check_gguf_type(gguf, "--gguf")
            refusal = gguf_refusal(model_config)
            if refusal:
                raise PruningError(f"--gguf: {refusal}.")

    def check_windows_fit(self, model_config, evaluation: Evaluation | None = None,
                          recovery: Recovery | None = None) -> None:
        """Refuse windows of ``seqlen`` longer than the model's positions where anything runs them:
        the calibration, the evaluation or the recovery (``model_config``: the model's config)."""
        if self.method.needs_calibration or (evaluation is not None and evaluation.dataset is not None) \
                or recovery is not None:
            check_seqlen(model_config, self.config.seqlen)

    def check_arguments(self, calibration_data=None, checkpoint_dir=None, resume: bool = False,
                        activations: str = "device", activation_folder=None, device=None) -> None:
        """The checks of `prune`'s arguments that need no model, in seconds (`PruningError` names the
        fix): `prune` makes them first, and the CLI calls this before it loads the model."""
        check_device(device)
        check_place(activations)
        if activation_folder is not None and activations != "disk":
            raise PruningError("activation_folder (--activation-folder) is where activations='disk' (--activations "
                               "disk) writes; pass that too.")
        if resume and checkpoint_dir is None:
            raise PruningError("resume needs checkpoint_dir (--checkpoint-dir): the folder of the interrupted prune.")
        if self.method.needs_calibration and calibration_data is None and self.config.dataset is None:
            raise PruningError(f"Method {self.config.method!r} needs calibration data: pass --dataset "
                               f"(from Python: calibration_data=, or dataset in the config).")
        preflight(checkpoint_dir=checkpoint_dir, activation_folder=activation_folder)

    def save_pretrained(self, save_directory: str | os.PathLike, model: nn.Module | None = None, tokenizer=None,
                        overwrite: bool = False, push_to_hub: bool = False, repo_id: str | None = None,
                        private: bool | None = None, token: str | bool | None = None, **kwargs) -> str:
        """Save the pruned model (see `save_pruned`: ``gguf="q8_0"`` also writes a GGUF file for
        llama.cpp); with ``push_to_hub``, then upload the saved folder to ``repo_id`` (default: the
        folder's name) as `push_to_hub` does."""
        model = model if model is not None else self.model
        if model is None:
            raise PruningError("Nothing to save: call prune() first or pass model=.")
        if push_to_hub:
            repo_id = repo_id or os.path.basename(os.path.abspath(os.fspath(save_directory)))
            check_repo_id(repo_id)
        if "results" not in kwargs and self.report is not None and model is self.model:
            kwargs["results"] = {"sparsity": self.report.overall_sparsity, "prune_seconds": self.report.seconds}
        if push_to_hub:
            kwargs["results"] = {**(kwargs.get("results") or {}), "hub_repo": repo_id}
        if self.checkpoint is not None:
            kwargs.setdefault("protect", [("the checkpoint folder", self.checkpoint.directory)])
        self.saved_to = save_pruned(model, save_directory, self.config, tokenizer or self.tokenizer,
                                    overwrite=overwrite, **kwargs)
        if push_to_hub:
            self.push_to_hub(repo_id, private=private, token=token)
        return self.saved_to

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None) -> str | None:
        """Upload the folder of the last successful `save_pretrained` to the Hub repo ``repo_id``
        (created if missing); returns the commit URL (None on the processes other than rank 0).
        Nothing is uploaded before a save succeeded."""
        if self.saved_to is None:
            raise PruningError("Nothing to upload: save_pretrained(folder) first; push_to_hub uploads that folder.")
        if not is_main_process():  # several processes: rank 0 saved the folder and uploads it
            return None
        return push_folder(self.saved_to, repo_id, private=private, token=token, commit_message=commit_message)


_GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # bytes per weight of each GGUF type


def saved_bytes(model: nn.Module, gguf: str | None = None) -> int:
    """About what saving ``model`` writes: its weights as they are stored (a pruned model is at
    most as large as the dense one), and the GGUF file when one is written."""
    count = sum(p.numel() for p in model.parameters())
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(stored + (count * _GGUF_BYTES[gguf] if gguf in _GGUF_BYTES else 0))


def model_source(model) -> str | None:
    """The local folder a model was loaded from (``config._name_or_path``), if it is one."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    return source if isinstance(source, str) and source and os.path.isdir(source) else None


def save_pruned(
    model, save_directory, config: PruningConfig, tokenizer=None, overwrite: bool = False, extra_files=None,
    results: dict | None = None, command: str | None = None, base_model: str | None = None, protect=(),
    gguf: str | None = None, **kwargs,
) -> str:
    """Write model, tokenizer, ``pruning_config.json`` and a model card (``README.md``, see
    `optimum_prune.model_card`; ``results``, ``command`` and ``base_model`` go into it) atomically:
    into a temporary sibling folder, swapped into place only when everything is written
    (`optimum_prune.output.OutputFolder`: ``overwrite`` replaces only a previous optimum-prune
    output, never the folder the model was loaded from, the working or home directory).
    ``save_directory`` is a path, or an `OutputFolder` reserved before the prune (the CLI does
    that, so that its lock covers the whole run). ``protect``: more (description, path) pairs the
    output may not replace. With several processes only rank 0 writes.

    A Llama / Mistral / Qwen2 model whose layers differ in width is saved in the Nemotron-NAS form
    that vLLM, SGLang, TensorRT-LLM and MLX read (`optimum_prune.export.nemotron_nas`), where that
    form can express it. ``gguf`` (``f32``, ``f16``, ``bf16``, ``q8_0``): also write
    ``<folder name>-<gguf>.gguf`` for llama.cpp into the folder (`optimum_prune.export.gguf`)."""
    if gguf is not None:  # before anything is written
        from .export.gguf import check_gguf_type

        check_gguf_type(gguf)
    args = (model, save_directory, config, tokenizer, overwrite, extra_files, results, command, base_model, protect,
            gguf)
    if is_distributed():  # one writer: rank 0; the others wait until the folder is complete
        import torch.distributed

        if is_main_process():
            try:
                path = _save(*args, **kwargs)
            finally:
                torch.distributed.barrier()
            return path
        torch.distributed.barrier()
        return os.path.abspath(os.fspath(getattr(save_directory, "path", save_directory)))
    return _save(*args, **kwargs)


def _save(model, save_directory, config, tokenizer, overwrite, extra_files, results, command, base_model, protect,
          gguf, **kwargs):
    from .export.engines import where_it_runs
    from .export.gguf import export_gguf
    from .export.nemotron_nas import to_nemotron_nas
    from .model_card import build_model_card

    if isinstance(save_directory, OutputFolder):
        output, owned = save_directory, False
    else:
        output = OutputFolder(save_directory, overwrite, inputs=[("the model's folder", model_source(model)), *protect])
        owned = True

    def write(folder: str) -> None:
        if getattr(model, "config", None) is not None:
            model.config.pruning_config = config.to_dict()
        model.save_pretrained(folder, **kwargs)
        card_results = dict(results or {})
        if getattr(getattr(model, "config", None), "layer_widths", None) is not None:
            kept = to_nemotron_nas(folder)
            card_results["form"] = ("Saved in the Nemotron-NAS form (`DeciLMForCausalLM`, one `block_configs` entry "
                                    "per layer), which serving engines read." if kept is None else
                                    f"Saved in optimum-prune's own form: no Nemotron-NAS form, {kept}.")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        gguf_file = None
        if gguf is not None:
            gguf_file = f"{os.path.basename(output.path)}-{gguf}.gguf"
            export_gguf(folder, os.path.join(folder, gguf_file), dtype=gguf)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            serving = where_it_runs(json.load(handle), config.pattern, gguf_file)
        card = build_model_card(model, config, base_model=base_model, results=card_results, command=command,
                                serving=serving)
        card.save(os.path.join(folder, "README.md"))
        for name, content in (extra_files or {}).items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
                handle.write(content)

    try:
        return output.write(write)
    finally:
        if owned:
            output.release()
