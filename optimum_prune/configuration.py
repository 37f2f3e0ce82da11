"""`PruningConfig`: everything that defines one prune, validated on construction, JSON round-trip.

A config says *what* to do (method, sparsity, pattern, which Linears), *with which data*
(calibration samples, window length, seed) and carries the method's own options in
``method_kwargs``, validated against the method's ``Options`` dataclass. It travels with the
pruned model: as ``pruning_config.json`` next to the weights and under ``pruning_config`` in the
model's ``config.json``.

It is an Optimum configuration (`optimum.configuration_utils.BaseConfig`, as optimum-intel's
``OVConfig``, with its own ``CONFIG_NAME``): ``from_pretrained`` takes a folder, a file or a Hub repo
id (``revision``, ``token``, ``cache_dir``, ``subfolder``, ``local_files_only``), ``push_to_hub``
uploads it. The JSON it writes holds the prune's fields only (plus ``format_version`` and the
optimum-prune version), as before it was one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import field
from typing import Any

from optimum.configuration_utils import BaseConfig

from .errors import PruningError
from .fields import ENGINE_WIDTH_MULTIPLE, WHOLE_ATTENTION_ENGINES, check_plain_fields
from .paths import looks_local, missing_local
from .patterns import SparsityPattern, resolve_sparsity  # noqa: F401 - re-exported: configuration speaks this vocabulary


CONFIG_NAME = "pruning_config.json"
FORMAT_VERSION = 1

def _check_patterns(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise PruningError(f"{name} must be a list of module-name patterns (glob, or 're:' + regex), got {value!r}.")
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise PruningError(f"{name}: invalid regular expression {pattern!r} ({err}).") from None
    return list(value)


#: Keyword arguments of `PruningConfig.from_pretrained` that locate the file (as elsewhere in Transformers).
HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download", "proxies")


class PruningConfig(BaseConfig):
    """Configuration of one prune.

    Args:
        method: registered method name (``optimum_prune.available_methods()``).
        sparsity: fraction of weights removed in each pruned Linear, in [0, 1). Defaults to 0.5;
            fixed by N:M patterns (2:4 -> 0.5).
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"structured"``.
        targets: module-name patterns of the Linears to prune (fnmatch globs such as ``"*.mlp.*"``,
            or ``"re:<regex>"``); default: every Linear inside the decoder layers. Embeddings and
            the LM head are never pruned.
        ignore: module-name patterns excluded from ``targets``.
        overrides: per-module settings, ``{pattern: {"sparsity": 0.3, "pattern": "2:4"}}``; the first
            matching pattern wins.
        num_calibration_samples, seqlen: calibration windows and their length in tokens.
        batch_size: windows per forward pass during calibration.
        seed: seeds the choice of calibration windows (and any randomised method).
        dampening: ``lambda`` in ``H + lambda * mean(diag H) * I`` before factorising.
        sequential: each layer sees the outputs of the already-pruned layers before it (default);
            ``False`` runs every layer once and feeds the next layer with dense outputs (faster).
        channel_multiple: structured pruning keeps a multiple of this many MLP channels per layer
            (hardware-friendly widths; 1 = the exact budget).
        expert_calibration: fused mixture-of-experts banks: each expert is solved with the statistics
            of the tokens its router sends it (``"routed"``, default) or of every calibration token
            (``"all"``: rare experts are not starved; the layer's output is unchanged).
        min_expert_tokens: an expert that received fewer routed tokens than this is pruned by weight
            magnitude instead, at the same target (counted in the report's ``expert_fallbacks``).
        dataset, dataset_config, dataset_split, text_column: default calibration data when
            ``Pruner.prune`` gets none (hub name, local .txt/.json/.jsonl, or ``packaged:wiki-leads``).
        sparsity_profile: ``"uniform"`` (every layer at ``sparsity``), ``"owl"`` (outlier-weighed
            layer-wise sparsity: layers whose Wanda scores hold more outliers keep more weights) or
            ``"sensitivity"`` (each layer's measured loss increase when it alone is pruned at a few
            levels; the budget goes where it costs the least loss); the average over the targeted
            weights is ``sparsity``; unstructured patterns.
        owl_lambda, owl_threshold: OWL's spread (layer sparsities within ``sparsity +- owl_lambda``
            before the bounds) and outlier threshold M (a score above M x its layer's mean is an outlier).
        sensitivity_samples: ``"sensitivity"``: how many of the calibration windows measure the loss.
        layer_patterns: with an N:M ``pattern`` and ``sparsity_profile="sensitivity"``, the other
            patterns a layer may get instead (N:M such as ``"4:8"``, or ``"dense"``); each layer
            takes the choice that costs the least measured loss while the average sparsity over the
            targeted weights stays at least ``sparsity`` (default: the pattern's own, N/M).
        layer_sparsity_min, layer_sparsity_max: bounds on every layer's sparsity under a profile.
        messages_column, calibration_format: chat data: the column of conversations (lists of
            ``{"role", "content"}`` messages, rendered with the tokenizer's chat template), and whether
            to use it when present (``"auto"``), require it (``"chat"``) or read plain text (``"text"``).
        method_kwargs: the method's own options, checked against its ``Options`` dataclass.
        serve_with: the engine the output is meant for (``"transformers"``, ``"vllm"``, ``"sglang"``,
            ``"tensorrt-llm"``, ``"mlx"``, ``"llama.cpp"``). When a structured prune can give the layers
            different widths (a global method, overrides), the prune produces only what that engine
            reads: MLP widths on its grid (``channel_multiple`` raised to 256 for SGLang, TensorRT-LLM
            and MLX, to 32 for llama.cpp) and, for the Nemotron-NAS engines, attention left whole
            (``"*.self_attn"`` added to ``ignore``); families the engine cannot serve that way are
            refused before any work (docs/deploy.md).
    """

    CONFIG_NAME = CONFIG_NAME
    FULL_CONFIGURATION_FILE = CONFIG_NAME
    model_type = "optimum_prune"

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_calibration_samples: int = 64
    seqlen: int = 512
    batch_size: int = 8
    seed: int = 0
    dampening: float = 0.01
    sequential: bool = True
    channel_multiple: int = 32
    expert_calibration: str = "routed"
    min_expert_tokens: int = 16
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    messages_column: str = "messages"
    calibration_format: str = "auto"
    sparsity_profile: str = "uniform"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    sensitivity_samples: int = 2
    layer_patterns: list[str] | None = None
    layer_sparsity_min: float = 0.0
    layer_sparsity_max: float = 0.99
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    serve_with: str = "transformers"

    def __post_init__(self, **kwargs):
        from .registry import get_method

        if kwargs:  # a misspelt field must not pass unnoticed
            raise PruningError(f"Unknown pruning config field(s) {', '.join(sorted(kwargs))}; known fields: "
                               f"{', '.join(self.field_names())}.")
        super().__post_init__()
        check_plain_fields({name: getattr(self, name) for name in self.field_names()})
        method_cls = get_method(self.method)
        self.method = method_cls.name  # an alias ("pg") becomes the method's name
        parsed = SparsityPattern.parse(self.pattern)
        self.pattern = str(parsed)
        self._check_supported(method_cls, parsed, "")
        if self.layer_patterns is None or self.sparsity is None:
            self.sparsity = resolve_sparsity(self.sparsity, parsed)
        # else: mixed N:M patterns, ``sparsity`` is the average asked for (checked in _check_profile)

        self.targets = _check_patterns(self.targets, "targets") or None
        self.ignore = _check_patterns(self.ignore, "ignore")
        if not isinstance(self.overrides, dict):
            raise PruningError(f"overrides must map module patterns to settings, got {self.overrides!r}.")
        for key, value in self.overrides.items():
            _check_patterns([key], "overrides")
            if not isinstance(value, dict) or not value or set(value) - {"sparsity", "pattern"}:
                raise PruningError(
                    f"overrides[{key!r}] must be a dict with 'sparsity' and/or 'pattern', got {value!r}."
                )
            sub = SparsityPattern.parse(value.get("pattern", self.pattern))
            self._check_supported(method_cls, sub, f"overrides[{key!r}]: ")
            resolve_sparsity(value.get("sparsity"), sub, f"overrides[{key!r}]: ")

        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or not (
            0.0 <= self.dampening < 1e3
        ):
            raise PruningError(f"dampening must be a non-negative number (0.01 is typical), got {self.dampening!r}.")
        if not isinstance(self.sequential, bool):
            raise PruningError(f"sequential must be true or false, got {self.sequential!r}.")
        for name in ("dataset", "dataset_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PruningError(f"{name} must be a string, got {value!r}.")
        self._check_profile(method_cls, parsed)
        for name in ("dataset_split", "text_column", "messages_column"):
            if not isinstance(getattr(self, name), str):
                raise PruningError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if not isinstance(self.method_kwargs, dict):
            raise PruningError(f"method_kwargs must be a JSON object of the method's options, got {self.method_kwargs!r}.")
        options = method_cls.parse_options(self.method_kwargs)  # raises with the list of known options
        for option, name in method_cls.delegated_methods(options).items():
            delegate = get_method(name)  # unknown name: PruningError listing the methods
            if "structured" not in delegate.supported_patterns or delegate.is_global:
                raise PruningError(f"{method_cls.name} option {option} must be a layer-wise structured method "
                                   f"(fasp, spap, wanda-sp), got {name!r}.")
        self._apply_engine(method_cls)

    def _apply_engine(self, method_cls) -> None:
        """``serve_with``'s rules for a structured prune whose layers can differ in width."""
        if self.pattern != "structured":
            return
        per_layer = self.per_layer_widths(method_cls)
        if per_layer or self.serve_with == "llama.cpp":  # llama.cpp: q8_0 rows, uniform widths too
            self.channel_multiple = math.lcm(self.channel_multiple, ENGINE_WIDTH_MULTIPLE[self.serve_with])
        if per_layer and self.serve_with in WHOLE_ATTENTION_ENGINES and "*.self_attn" not in self.ignore:
            self.ignore = [*self.ignore, "*.self_attn"]

    def per_layer_widths(self, method_cls=None) -> bool:
        """Whether a structured prune with this config can give the decoder layers different widths."""
        if method_cls is None:
            from .registry import get_method

            method_cls = get_method(self.method)
        if method_cls.removes_layers:  # fewer layers, every one as wide as before: a stock config
            return False
        return bool(method_cls.is_global or self.overrides or self.sparsity_profile != "uniform")

    def _check_profile(self, method_cls, parsed: SparsityPattern) -> None:
        for name in ("owl_lambda", "owl_threshold", "layer_sparsity_min", "layer_sparsity_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PruningError(f"{name} must be a number, got {value!r}.")
        if not 0 <= self.owl_lambda < 0.5 or self.owl_threshold <= 0:
            raise PruningError(f"owl_lambda must be in [0, 0.5) and owl_threshold > 0, got {self.owl_lambda!r} and "
                               f"{self.owl_threshold!r} (the paper's defaults: 0.08 and 5).")
        if not 0 <= self.layer_sparsity_min <= self.sparsity <= self.layer_sparsity_max < 1:
            raise PruningError(f"layer_sparsity_min <= sparsity <= layer_sparsity_max < 1 must hold, got "
                               f"{self.layer_sparsity_min!r} <= {self.sparsity!r} <= {self.layer_sparsity_max!r}.")
        if isinstance(self.sensitivity_samples, bool) or not isinstance(self.sensitivity_samples, int) \
                or self.sensitivity_samples < 1:
            raise PruningError(f"sensitivity_samples must be a whole number >= 1, got {self.sensitivity_samples!r}.")
        if self.layer_patterns is not None:
            self._check_layer_patterns(method_cls, parsed)
        if self.sparsity_profile == "uniform":
            return
        if parsed.kind == "nm" and self.sparsity_profile == "sensitivity" and self.layer_patterns:
            pass  # each layer chooses among the N:M patterns (and dense)
        elif parsed.kind != "unstructured":
            raise PruningError(f"sparsity_profile={self.sparsity_profile!r} spreads an unstructured sparsity over the "
                               f"layers; with pattern {parsed} use sparsity_profile='sensitivity' and the patterns a "
                               f"layer may get instead, e.g. layer_patterns=['4:8', 'dense'] (--layer-patterns 4:8 "
                               f"dense), or sparsity_profile='uniform'.")
        if not method_cls().needs_calibration:
            raise PruningError(f"sparsity_profile={self.sparsity_profile!r} measures the layers on calibration data; "
                               f"method {method_cls.name!r} uses none: choose wanda, sparsegpt, alps, ...")

    def _check_layer_patterns(self, method_cls, parsed: SparsityPattern) -> None:
        if self.sparsity_profile != "sensitivity" or parsed.kind != "nm":
            raise PruningError(f"layer_patterns choose among N:M patterns per layer: they need an N:M pattern (got "
                               f"{parsed}) and sparsity_profile='sensitivity' (got {self.sparsity_profile!r}).")
        if not isinstance(self.layer_patterns, list) or not self.layer_patterns:
            raise PruningError(f"layer_patterns must be a non-empty list such as ['4:8', 'dense'], got "
                               f"{self.layer_patterns!r}.")
        choices = []
        for text in self.layer_patterns:
            if text == "dense":
                choices.append(0.0)
                continue
            sub = SparsityPattern.parse(text) if isinstance(text, str) else None
            if sub is None or sub.kind != "nm":
                raise PruningError(f"layer_patterns entries are N:M patterns or 'dense', got {text!r}.")
            self._check_supported(method_cls, sub, "layer_patterns: ")
            choices.append(sub.implied_sparsity)
        self.layer_patterns = ["dense" if t == "dense" else str(SparsityPattern.parse(t)) for t in self.layer_patterns]
        low, high = min(choices + [parsed.implied_sparsity]), max(choices + [parsed.implied_sparsity])
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not low - 1e-9 <= self.sparsity <= high + 1e-9:
            raise PruningError(f"with layer_patterns the sparsity is the average asked for: between {low:g} and "
                               f"{high:g} (what the patterns give), got {self.sparsity!r}.")

    @staticmethod
    def _check_supported(method_cls, parsed: SparsityPattern, where: str) -> None:
        if parsed.family in method_cls.supported_patterns:
            return
        from .registry import available_methods, get_method

        able = [name for name in available_methods() if parsed.family in get_method(name).supported_patterns]
        hint = f"methods that do: {', '.join(able)}" if able else "no installed method does yet"
        raise PruningError(
            f"{where}method {method_cls.name!r} does not support pattern {parsed} "
            f"(it supports {', '.join(method_cls.supported_patterns)}); {hint}."
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields of a prune (those of the Transformers base configuration left out)."""
        base = {f.name for f in dataclasses.fields(BaseConfig)}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in base)

    def __eq__(self, other) -> bool:
        return isinstance(other, PruningConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.field_names())
        return f"PruningConfig({fields})"

    # ------------------------------------------------------------------ derived views
    @property
    def parsed_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of `calibration_windows` that come from this config."""
        return dict(dataset_config=self.dataset_config, split=self.dataset_split, text_column=self.text_column,
                    messages_column=self.messages_column, calibration_format=self.calibration_format)

    @property
    def method_options(self):
        from .registry import get_method

        return get_method(self.method).parse_options(self.method_kwargs)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        from .version import __version__

        data = {name: copy.deepcopy(getattr(self, name)) for name in self.field_names()}
        data["format_version"] = FORMAT_VERSION
        data["optimum_prune_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs) -> "PruningConfig":
        """A config from its JSON object (what `to_dict` wrote, any earlier format version included);
        ``kwargs`` override fields."""
        if not isinstance(data, dict):
            raise PruningError(f"A pruning config must be a JSON object, got {type(data).__name__}.")
        data = {**data, **{k: v for k, v in kwargs.items() if not k.startswith("_") and k != "return_unused_kwargs"}}
        for key in ("transformers_version", "optimum_version", "model_type"):  # written by Optimum's own save
            data.pop(key, None)
        version = data.pop("format_version", FORMAT_VERSION)
        written_by = data.pop("optimum_prune_version", None)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            writer = f" (written by optimum-prune {written_by})" if written_by else ""
            raise PruningError(
                f"This pruning config has format version {version!r}{writer}; "
                f"this optimum-prune reads up to version {FORMAT_VERSION}: upgrade optimum-prune."
            )
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise PruningError(
                f"Unknown pruning config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PruningConfig":
        if os.path.isdir(path):
            raise PruningError(f"{path} is a folder; give its {CONFIG_NAME} (or use PruningConfig.from_pretrained).")
        return cls.from_dict(_read_json(os.fspath(path)))

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> str:
        """Write ``pruning_config.json`` into ``save_directory``; with ``push_to_hub``, also upload it
        (``repo_id``, ``token``, ``private``, ``commit_message``, as Transformers' ``save_pretrained``)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise PruningError(f"{save_directory} is a file; save_pretrained writes into a folder.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        self.to_json_file(path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **kwargs)
        return path

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, **kwargs) -> str:
        """Upload ``pruning_config.json`` to the Hub repo ``repo_id`` (created if missing); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, CONFIG_NAME)
            self.to_json_file(path)
            info = api.upload_file(path_or_fileobj=path, path_in_repo=CONFIG_NAME, repo_id=repo_id, revision=revision,
                                   commit_message=commit_message or "Upload pruning config")
        return str(info)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PruningConfig":
        """Read ``pruning_config.json`` from a folder, the file itself, or a Hub repo id (with
        ``revision``, ``token``, ``cache_dir``, ``subfolder``, ``local_files_only``, as
        ``from_pretrained`` elsewhere; ``HF_HUB_OFFLINE=1`` reads the local cache); falls back to the
        ``pruning_config`` entry of a pruned model's ``config.json``. Other ``kwargs`` override fields."""
        hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        subfolder = hub.get("subfolder") or ""
        if os.path.isfile(path):
            return cls.from_dict(_read_json(path), **kwargs)
        if os.path.isdir(path):
            folder = os.path.join(path, subfolder)
            candidate = os.path.join(folder, CONFIG_NAME)
            if os.path.isfile(candidate):
                return cls.from_dict(_read_json(candidate), **kwargs)
            model_config = os.path.join(folder, "config.json")
            if os.path.isfile(model_config):
                data = _read_json(model_config)
                if isinstance(data, dict) and "pruning_config" in data:
                    return cls.from_dict(data["pruning_config"], **kwargs)
            raise PruningError(f"No {CONFIG_NAME} (nor a config.json with 'pruning_config') in {folder}.")
        if looks_local(path, suffixes=(".json",)):
            raise PruningError(f"No pruning config: {missing_local(path)}; give a pruning_config.json, a folder "
                               f"holding one, or a Hub repo id (org/name).")
        return cls.from_dict(_hub_config(path, hub), **kwargs)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise PruningError(f"No pruning config at {path}.") from None
    except OSError as err:
        raise PruningError(f"Cannot read the pruning config {path} ({err.strerror or err}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PruningError(f"{path} is not valid JSON ({err}); fix or regenerate the file.") from None
    except RecursionError:
        raise PruningError(f"{path} is nested too deeply to be a pruning config; fix or regenerate the file.") from None


def _hub_config(repo_id: str, hub: dict) -> dict:
    """The pruning config of Hub repo ``repo_id`` (its ``pruning_config.json``, else the
    ``pruning_config`` entry of its ``config.json``), through the local cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    if hub.get("subfolder") == "":
        hub.pop("subfolder")
    where = f"{repo_id}" + (f" (revision {hub['revision']})" if hub.get("revision") else "")
    offline = False
    for name in (CONFIG_NAME, "config.json"):  # a pruned model's config.json carries it too
        try:
            data = _read_json(hf_hub_download(repo_id, name, **hub))
        except HFValidationError:
            raise PruningError(f"{repo_id!r} is neither a local file or folder nor a Hub repo id (org/name).") from None
        except LocalEntryNotFoundError:  # offline and not cached (a subclass of EntryNotFoundError)
            offline = True
            continue
        except EntryNotFoundError:
            continue
        except Exception as err:  # repository missing, private, gated, network
            first = str(err).splitlines()[0] if str(err) else ""
            raise PruningError(f"Cannot read the pruning config of {where} from the Hub ({type(err).__name__}: {first}); "
                               f"check the repo id, revision and token.") from None
        if name == CONFIG_NAME:
            return data
        if isinstance(data, dict) and "pruning_config" in data:
            return data["pruning_config"]
    if offline:
        raise PruningError(f"The pruning config of {where} is not in the local Hub cache and the Hub cannot be "
                           f"reached (offline?); download it once, or give a local folder.")
    raise PruningError(f"{where} has no {CONFIG_NAME} (nor a config.json with 'pruning_config').")
