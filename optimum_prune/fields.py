"""The plain fields of a `PruningConfig`: the choices they take and the checks that need neither
torch nor the method's class. One place for both: the config validates with them, and the CLI
takes its flag choices from here and checks flag values with them before torch is imported (a bad
value answers in a fraction of a second)."""

from __future__ import annotations

from typing import Any

from .errors import PruningError, check_int
from .patterns import SparsityPattern, resolve_sparsity


#: What calibration data is taken as: conversations when present (auto), conversations only, text only.
CALIBRATION_FORMATS = ("auto", "chat", "text")

#: How an unstructured sparsity is spread over the decoder layers (see calibration/profiles.py).
SPARSITY_PROFILES = ("uniform", "owl", "sensitivity")

#: How fused MoE experts are calibrated: on the tokens routed to each, or on every token.
EXPERT_CALIBRATION = ("routed", "all")

#: ``serve_with``: the engine the output is meant for (optimum_prune/export/engines.py has its rules)
SERVING_ENGINES = ("transformers", "vllm", "sglang", "tensorrt-llm", "mlx", "llama.cpp")
#: MLP widths each engine reads when the layers differ in width (SGLang, TensorRT-LLM and MLX read
#: Nemotron-NAS ``ffn_mult`` only: multiples of 256; llama.cpp's q8_0 rows: multiples of 32)
ENGINE_WIDTH_MULTIPLE = {"transformers": 1, "vllm": 1, "sglang": 256, "tensorrt-llm": 256, "mlx": 256, "llama.cpp": 32}
#: engines that keep every query head of a layer (Nemotron-NAS): no KV group removed per layer
WHOLE_ATTENTION_ENGINES = ("vllm", "sglang", "tensorrt-llm", "mlx")

#: GGUF tensor types the export writes (optimum_prune/export/gguf.py)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
#: Where calibration activations wait between decoder layers (optimum_prune/engine/activations.py)
ACTIVATION_PLACES = ("device", "cpu", "disk")
#: How a pruned model is recovered after pruning (``--recover``)
RECOVERY_METHODS = ("lora", "distill", "distill-lora")
#: where the distillation teacher's weights wait between its forwards (`workflow.Recovery.teacher_place`)
TEACHER_PLACES = ("device", "cpu", "disk")
#: the teacher's dtype (`workflow.Recovery.teacher_dtype`)
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
#: Weight dtypes a model is loaded in
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: integer fields and their minimum
INT_FIELDS = {"num_calibration_samples": 1, "seqlen": 2, "batch_size": 1, "seed": 0, "channel_multiple": 1,
              "min_expert_tokens": 0}
#: integer fields with a largest value: seeds feed torch and numpy generators (numpy's take < 2**32;
#: the recovery draws its windows with seed + 1)
INT_MAXIMA = {"seed": 2**32 - 2}
#: fields with a fixed set of values
CHOICE_FIELDS = {"sparsity_profile": SPARSITY_PROFILES, "expert_calibration": EXPERT_CALIBRATION,
                 "calibration_format": CALIBRATION_FORMATS, "serve_with": SERVING_ENGINES}


def check_plain_fields(values: dict[str, Any]) -> SparsityPattern | None:
    """Check the fields of ``values`` (a config's fields, possibly only some) that need neither torch
    nor the method's class: the method's name, the pattern and its sparsity, the integers, the
    choices. Returns the parsed pattern (None when ``values`` has none)."""
    from .registry import canonical_name

    if "method" in values:
        if not isinstance(values["method"], str):
            raise PruningError(f"method must be a registered method name, got {values['method']!r}.")
        canonical_name(values["method"])
    parsed = None
    if "pattern" in values:
        parsed = SparsityPattern.parse(values["pattern"])
        if values.get("layer_patterns") is None and values.get("sparsity") is not None:
            resolve_sparsity(values["sparsity"], parsed)
    for name, minimum in INT_FIELDS.items():
        if name in values:
            check_int(values[name], name, minimum, maximum=INT_MAXIMA.get(name))
    for name, choices in CHOICE_FIELDS.items():
        if name in values and values[name] not in choices:
            raise PruningError(f"{name} must be one of {', '.join(choices)}, got {values[name]!r}.")
    return parsed
