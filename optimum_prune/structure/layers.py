"""Generic discovery of decoder layers and target Linears.

Works for LLaMA, Mistral, Qwen2/Qwen3, OPT and other decoder-only models whose blocks sit in one
``nn.ModuleList`` (``model.layers``, ``model.decoder.layers``, ``transformer.h``, ...).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import PruningError


_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(prefix, layers)`` of the decoder layer list of a causal LM."""
    for path in _KNOWN_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if candidates:
        return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    raise PruningError(
        f"Cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
        f"{expected or 'N'} blocks; optimum-prune supports decoder-only causal LMs (LLaMA, Mistral, Qwen2/3, OPT, ...)."
    )


def matches(name: str, patterns) -> bool:
    """Whether ``name`` matches any of ``patterns`` (fnmatch globs or ``re:`` regexes)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def first_match(name: str, table: dict):
    """The value of the first key of ``table`` (a module-name pattern) that matches ``name``."""
    for pattern, value in table.items():
        if matches(name, [pattern]):
            return value
    return None


def select_target_linears(layer: nn.Module, layer_prefix: str, targets, ignore) -> dict[str, nn.Linear]:
    """Full-name -> Linear for the Linears of one decoder layer selected by ``targets``/``ignore``."""
    selected = {}
    for sub_name, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or is_router(module, sub_name, layer):
            continue
        full = f"{layer_prefix}.{sub_name}"
        if targets and not matches(full, targets):
            continue
        if ignore and matches(full, ignore):
            continue
        selected[full] = module
    return selected


def linear_params(module: nn.Module) -> int:
    """Weights and biases of every Linear inside ``module``."""
    return sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in module.modules()
        if isinstance(m, nn.Linear)
    )


def is_router(module: nn.Module, name: str = "", layer: nn.Module | None = None) -> bool:
    """Whether ``module`` (named ``name`` in decoder layer ``layer``) is a mixture-of-experts router
    or gate (kept dense by design: it decides where tokens go, and it is a tiny share of the
    weights): a router class (``*Router``, ``*MoeGate``, ``*TopKGate``), or a Linear named ``gate``
    beside the experts (Mixtral's older form) or ``*expert*_gate`` (Qwen2-MoE's
    ``shared_expert_gate``). Other Linears named like gates (Gemma 4's ``per_layer_input_gate``,
    a projection) are not routers."""
    cls = type(module).__name__.lower()
    if cls.endswith(("router", "moegate", "topkgate")):
        return True
    if not isinstance(module, nn.Linear):
        return False
    parent_name, _, last = name.rpartition(".")
    if re.fullmatch(r".*expert.*_gate", last):
        return True
    if last != "gate":
        return False
    if layer is None:
        return True
    parent = layer.get_submodule(parent_name) if parent_name else layer
    return any("expert" in child for child, _ in parent.named_children())


@dataclass
class WeightInventory:
    """Every matrix-shaped parameter of decoder layers (2 or more dimensions, not a bias), each
    counted once and sorted into one of four kinds: ``covered`` (in a tensor the prune targets),
    ``routers`` (routers and gates of mixture-of-experts blocks: left out on purpose), ``ignored``
    (left out by ``targets`` / ``ignore``), ``unhandled`` (selected, but no pruning path handles
    it: stays dense, and the user is told). ``total`` is the sum of all four."""

    total: int = 0
    covered: int = 0
    routers: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    unhandled: dict[str, int] = field(default_factory=dict)


def layer_matrices(layer: nn.Module, layer_prefix: str):
    """(full name, module's full name, parameter, whether it belongs to a router) for every
    matrix-shaped parameter of one decoder layer (biases left out, also per-expert 2-D ones)."""
    routers = []
    for sub_name, module in layer.named_modules():
        full_module = f"{layer_prefix}.{sub_name}" if sub_name else layer_prefix
        if is_router(module, sub_name, layer):
            routers.append(full_module + ".")
        in_router = any((full_module + ".").startswith(router) for router in routers)
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and not param_name.endswith("bias"):
                yield f"{full_module}.{param_name}", full_module, param, in_router


def weight_inventory(layers, prefix: str, targets, ignore, covered: set[str]) -> WeightInventory:
    """The `WeightInventory` of ``layers`` (decoder layer ``i`` named ``prefix.i``); ``covered``:
    full names of the parameters the prune's tasks touch. A parameter shared by several layers
    counts once."""
    inventory, seen = WeightInventory(), set()
    for index, layer in enumerate(layers):
        for full, full_module, param, router in layer_matrices(layer, f"{prefix}.{index}"):
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = param.numel()
            inventory.total += count
            if full in covered:
                inventory.covered += count
            elif router:
                inventory.routers[full] = count
            elif not parameter_selected(full_module, full, targets, ignore):
                inventory.ignored[full] = count
            else:
                inventory.unhandled[full] = count
    return inventory


def names_selected(names, targets, ignore) -> bool:
    """Whether ``targets`` / ``ignore`` select a thing known by any of ``names`` (a group and its
    Linears, a module and its parameter, a MoE block and its router and experts): ``targets``
    (when given) must match one of the names and ``ignore`` none."""
    if targets and not any(matches(name, targets) for name in names):
        return False
    return not (ignore and any(matches(name, ignore) for name in names))


def parameter_selected(module_name: str, full_name: str, targets, ignore) -> bool:
    """Whether ``targets`` / ``ignore`` select a parameter that is not a Linear's weight: the
    patterns may name its module or the parameter itself."""
    return names_selected((module_name, full_name), targets, ignore)


def summarize_names(names, prefix: str) -> list[str]:
    """Names of tensors across layers, the layer index replaced by ``*`` (``model.layers.*.mlp.x``),
    in first-seen order."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.\d+\.")
    seen = {}
    for name in names:
        seen.setdefault(pattern.sub(f"{prefix}.*.", name), None)
    return list(seen)
