"""Whole experts of a mixture-of-experts block: which block, router and count, and removing experts.

A MoE block (Mixtral's ``block_sparse_moe``/``mlp``, Qwen-MoE's ``mlp``, gpt-oss's ``mlp``, ...)
holds a router (``gate`` / ``router``: a ``[num_experts, hidden]`` weight, sometimes a bias and, in
DeepSeek-V3, a routing bias buffer ``e_score_correction_bias``) and a fused experts module
(`experts.is_fused_experts`) whose tensors have one slice per expert along their first dimension.
Removing expert ``e`` removes its slice from every expert tensor and its row from every router
tensor, and every module that copied the count (``num_experts``) sees the new one: the router then
chooses its top-k among the experts that are left, as if the removed experts' logits were -inf.

A DeepSeek-style router that first picks ``n_group`` groups of experts keeps its groups: experts
are removed in equal numbers from every group (``routing_groups``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningError
from .experts import ExpertBank, expert_banks, is_fused_experts
from .layers import names_selected


#: Config fields that hold a MoE model's number of routed experts (one of them, the others aliases).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: Config fields that hold how many experts each token is routed to.
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")


@dataclass
class MoEBlock:
    """One MoE block of a decoder layer: ``module`` (full name ``name``) with its ``router`` and
    fused ``experts``."""

    name: str
    module: nn.Module
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    @property
    def top_k(self) -> int:
        for holder in (self.router, self.module):
            for key in ("top_k", "num_experts_per_tok"):
                value = getattr(holder, key, None)
                if isinstance(value, int):
                    return value
        raise PruningError(f"{self.name}: cannot tell how many experts each token is routed to.")

    @property
    def groups(self) -> int:
        return routing_groups(self.router)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: its slices of the expert tensors and its router rows."""
        return sum(tensor.numel() // self.num_experts for _, _, tensor in expert_slices(self))

    @property
    def params(self) -> int:
        return self.expert_params * self.num_experts

    @property
    def family(self) -> str:
        return type(self.module).__name__


def routing_groups(router: nn.Module) -> int:
    """Expert groups the router picks from first (DeepSeek-V3's ``n_group``), 1 if none."""
    value = getattr(router, "num_group", None) or getattr(router, "n_group", None)
    return int(value) if isinstance(value, int) and value > 0 else 1


def find_router(block: nn.Module, experts: nn.Module, num_experts: int) -> tuple[str, nn.Module] | None:
    """The child of ``block`` holding a ``[num_experts, hidden]`` routing weight."""
    for name, child in block.named_children():
        weight = getattr(child, "weight", None)
        if child is experts or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.shape[0] == num_experts and weight.shape[0] > 1:
            return name, child
    return None


def moe_blocks(layer: nn.Module, layer_prefix: str, targets=None, ignore=None) -> list[MoEBlock]:
    """The MoE blocks of one decoder layer (fused experts and their router) selected by
    ``targets`` / ``ignore`` (matched against the block's, the router's or the experts' name)."""
    blocks = []
    for sub_name, module in layer.named_modules():
        for child_name, child in module.named_children():
            if not is_fused_experts(child):
                continue
            count = next(p.shape[0] for p in child.parameters(recurse=False) if p.dim() == 3)
            found = find_router(module, child, count)
            if found is None:
                continue
            name = f"{layer_prefix}.{sub_name}" if sub_name else layer_prefix
            block = MoEBlock(name, module, f"{name}.{found[0]}", found[1], f"{name}.{child_name}", child)
            if names_selected([block.name, block.router_name, block.experts_name], targets, ignore):
                blocks.append(block)
    return blocks


def expert_slices(block: MoEBlock) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every parameter and buffer of the experts module and the router
    with one slice per expert along its first dimension."""
    count = block.num_experts
    return [(module, name, tensor) for module in (block.experts, block.router)
            for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
            if tensor.shape[:1] == (count,)]


def check_removal(block: MoEBlock, remove: int) -> None:
    """Refuse a removal that leaves fewer experts than a token is routed to, or fewer than two in
    one of the router's expert groups (it ranks groups by their two best experts)."""
    left = block.num_experts - remove
    if left < max(block.top_k, 1):
        raise PruningError(
            f"{block.name}: removing {remove} of {block.num_experts} experts leaves {left}, fewer than the "
            f"{block.top_k} each token is routed to; lower the sparsity to at most "
            f"{(block.num_experts - block.top_k) / block.num_experts:g}."
        )
    if block.groups > 1 and left // block.groups < 2:
        raise PruningError(
            f"{block.name}: the router picks among {block.groups} groups of experts, and removing {remove} of "
            f"{block.num_experts} leaves fewer than 2 in a group; lower the sparsity."
        )


def remove_experts(block: MoEBlock, keep: torch.Tensor, set_param, read=None) -> None:
    """Keep only experts ``keep`` (sorted indices) of ``block``: slice every expert tensor and
    router row, and update the counts the modules copied. ``set_param(module, name, tensor)``
    writes a parameter and ``read(module, name)`` reads one (the engine's go through accelerate's
    offload store; default: the module's own tensors)."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    count = block.num_experts
    if keep.numel() < 1 or int(keep.max()) >= count:
        raise PruningError(f"{block.name}: the experts to keep must index 0..{count - 1}.")
    for module, name, tensor in expert_slices(block):
        if isinstance(tensor, nn.Parameter):
            value = read(module, name) if read is not None else tensor.data
            set_param(module, name, value.index_select(0, keep.to(value.device)))
        else:  # a buffer (DeepSeek's routing bias)
            setattr(module, name, tensor.index_select(0, keep.to(tensor.device)))
    for module in (block.module, block.router, block.experts):
        for key in EXPERT_COUNT_KEYS:
            if getattr(module, key, None) == count:
                setattr(module, key, keep.numel())


def expert_count_key(config) -> str | None:
    """The config field that holds the number of routed experts (resolving aliases), or None."""
    aliases = getattr(config, "attribute_map", {}) or {}
    for key in EXPERT_COUNT_KEYS:
        real = aliases.get(key, key)
        if real in vars(config):
            return real
    return None


# ------------------------------------------------------------------------------------------------
# Narrower experts: each expert keeps the same number of its intermediate channels (a fused bank
# holds experts of one width), chosen per expert.
@dataclass
class ExpertChannels:
    """The intermediate channels of every expert of one fused experts module ``module`` (full name
    ``name``): ``up`` (``gate_up_proj``, or ``up_proj`` without a gate) produces them, ``down``
    consumes them. With a gate, expert ``e``'s ``[2 x width, hidden]`` matrix holds the gate rows
    then the up rows (``interleaved``: gate and up alternate, gpt-oss)."""

    name: str
    module: nn.Module
    up: ExpertBank
    down: ExpertBank
    has_gate: bool
    interleaved: bool

    @property
    def width(self) -> int:
        """Channels per expert."""
        return self.down.in_features

    @property
    def num_experts(self) -> int:
        return self.down.num_experts

    def bias(self, bank: ExpertBank) -> str | None:
        name = f"{bank.param}_bias"
        value = getattr(self.module, name, None)
        return name if isinstance(value, torch.Tensor) else None

    @property
    def params_per_channel(self) -> int:
        """Parameters one channel of one expert holds (its up/gate rows, their biases, its down column)."""
        rows = 2 if self.has_gate else 1
        return rows * (self.up.in_features + (self.bias(self.up) is not None)) + self.down.out_features

    @property
    def params(self) -> int:
        return self.params_per_channel * self.width * self.num_experts

    def producer_rows(self, channels: torch.Tensor) -> list[torch.Tensor]:
        """Rows of an expert's ``[out, in]`` up matrix that ``channels`` own: [gate rows, up rows]
        with a gate, [up rows] without."""
        if not self.has_gate:
            return [channels]
        if self.interleaved:
            return [2 * channels, 2 * channels + 1]
        return [channels, channels + self.width]

    def kept_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """The up matrix's rows of the kept channels, in the layout the module computes with."""
        rows = self.producer_rows(keep)
        return torch.stack(rows, 1).reshape(-1) if self.interleaved else torch.cat(rows)


def expert_channel_modules(layer: nn.Module, layer_prefix: str, targets=None, ignore=None) -> list[ExpertChannels]:
    """The fused experts modules of one decoder layer whose channels can be narrowed, selected by
    ``targets`` / ``ignore`` (matched against the experts module's or its MoE block's name)."""
    found = []
    for sub_name, module in layer.named_modules():
        if not is_fused_experts(module):
            continue
        name = f"{layer_prefix}.{sub_name}" if sub_name else layer_prefix
        if not names_selected([name, name.rsplit(".", 1)[0]], targets, ignore):
            continue
        banks = expert_banks(module, name, None, [])
        has_gate = bool(getattr(module, "has_gate", True))
        up = banks.get(f"{name}.gate_up_proj" if has_gate else f"{name}.up_proj")
        down = banks.get(f"{name}.down_proj")
        if up is None or down is None:
            raise PruningError(f"{name}: a {type(module).__name__} without gate_up_proj/down_proj banks cannot be "
                               f"narrowed; remove whole experts (expert-drop) or prune it unstructured.")
        found.append(ExpertChannels(name, module, up, down, has_gate, not bool(getattr(module, "is_concatenated", True))))
    return found


def narrow_experts(channels: ExpertChannels, up: torch.Tensor, down: torch.Tensor, up_bias: torch.Tensor | None,
                   set_param) -> None:
    """Give the experts module its narrower banks (``up`` / ``down`` as stored, ``up_bias`` if any)
    and update the width the module copied (``intermediate_dim`` / ``intermediate_size``)."""
    old = channels.width
    set_param(channels.module, channels.up.param, up)
    set_param(channels.module, channels.down.param, down)
    if up_bias is not None:
        set_param(channels.module, channels.bias(channels.up), up_bias)
    new = channels.down.in_features
    for key in ("intermediate_dim", "intermediate_size", "moe_intermediate_size", "expert_dim"):
        if getattr(channels.module, key, None) == old:
            setattr(channels.module, key, new)


def tied_shared_experts(block: nn.Module, width: int, config) -> list[tuple[str, nn.Module]]:
    """(child name, module) of the gated-MLP shared experts of a MoE block whose width the config
    derives from the experts' (``n_shared_experts x moe_intermediate_size``: DeepSeek-V2/V3,
    GLM-4-MoE, ...): narrowing the experts narrows them in proportion."""
    shared = getattr(config, "n_shared_experts", None)
    if not isinstance(shared, int) or shared < 1:
        return []
    found = []
    for name, child in block.named_children():
        down = getattr(child, "down_proj", None)
        if (isinstance(down, nn.Linear) and isinstance(getattr(child, "gate_proj", None), nn.Linear)
                and isinstance(getattr(child, "up_proj", None), nn.Linear) and down.in_features == shared * width):
            found.append((name, child))
    return found


def expert_width_key(config) -> str:
    """The config field that holds the experts' intermediate width."""
    return "moe_intermediate_size" if "moe_intermediate_size" in vars(config) else "intermediate_size"


def layer_expert_widths(layer: nn.Module) -> int | None:
    """The intermediate width of the layer's first fused experts module (None without one)."""
    modules = expert_channel_modules(layer, "")
    return modules[0].width if modules else None
