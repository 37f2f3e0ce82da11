"""optimum-prune's model classes known to transformers' Auto classes without importing them.

`import optimum_prune` must stay light (no torch, no transformers modelling module), yet a folder
holding a heterogeneous pruned model (``optimum_pruned_*`` or ``nemotron-nas`` model types) should
load with ``AutoModelForCausalLM.from_pretrained`` once optimum-prune is imported. `install`
therefore puts a placeholder for each of our model types into transformers' config mapping as soon
as that mapping exists (at once if transformers' Auto classes are already imported, else right
after transformers imports them); the first use of a placeholder (a config of that type being
loaded) imports ``optimum_prune.modeling``, which registers the real classes
(`optimum_prune.modeling.register`) in their place.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


#: Our model types (tests/test_layering.py checks them against ``optimum_prune.modeling``).
MODEL_TYPES = (
    "nemotron-nas", "optimum_pruned_deepseek_v3", "optimum_pruned_gemma2", "optimum_pruned_gemma3_text",
    "optimum_pruned_gpt_neox", "optimum_pruned_gpt_oss", "optimum_pruned_llama", "optimum_pruned_mistral",
    "optimum_pruned_mixtral", "optimum_pruned_olmoe", "optimum_pruned_opt", "optimum_pruned_phi3",
    "optimum_pruned_qwen2", "optimum_pruned_qwen2_moe", "optimum_pruned_qwen3", "optimum_pruned_qwen3_moe",
)
AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_models() -> None:
    """Register the model classes of heterogeneous pruned models with the Auto classes now
    (imports them: torch and transformers' modelling files of the supported families)."""
    from .modeling import register

    register()


class _Placeholder:
    """Stands for one of our config classes in transformers' config mapping until first used."""

    def __init__(self, model_type: str):
        self.model_type = model_type

    def _real(self):
        register_models()  # replaces every placeholder with the real class
        return sys.modules[AUTO_CONFIG_MODULE].CONFIG_MAPPING[self.model_type]

    def __getattr__(self, name):
        return getattr(self._real(), name)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)


def _add_placeholders(module) -> None:
    extra = module.CONFIG_MAPPING._extra_content
    for model_type in MODEL_TYPES:
        extra.setdefault(model_type, _Placeholder(model_type))


class _AfterAutoConfig(importlib.abc.MetaPathFinder):
    """Adds the placeholders right after transformers executes its config mapping module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != AUTO_CONFIG_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _add_placeholders(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make our model types loadable through the Auto classes, importing nothing heavy."""
    if AUTO_CONFIG_MODULE in sys.modules:
        _add_placeholders(sys.modules[AUTO_CONFIG_MODULE])
    elif not any(isinstance(finder, _AfterAutoConfig) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoConfig())
