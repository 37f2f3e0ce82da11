"""Fused mixture-of-experts banks: how transformers 5 stores the experts of a MoE layer.

Most MoE families keep their experts in one ``*Experts`` module whose matrices are 3-D parameters,
``[num_experts, out, in]`` (``gate_up_proj``, ``down_proj``; Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3,
OLMoE, GLM-4-MoE, ...) or transposed ``[num_experts, in, out]`` (gpt-oss, Aria), with optional
per-expert biases. Classes built with transformers' ``use_experts_implementation`` decorator say
which (``is_transposed``), and their eager forward multiplies by one expert's slice
(``bank[expert]``) for the tokens routed to it: that is what the calibration hooks intercept.

An `ExpertBank` names one such parameter; `expert_matrix` / `set_expert_matrix` read and write
expert ``e``'s matrix as the 2-D ``[out, in]`` problem the methods solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import parameter_selected


@dataclass(frozen=True)
class ExpertBank:
    """The 3-D parameter ``param`` of the experts module ``module`` (full name ``name``)."""

    name: str
    module: nn.Module
    param: str
    transposed: bool  # stored [experts, in, out] instead of [experts, out, in]

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def num_experts(self) -> int:
        return self.tensor.shape[0]

    @property
    def in_features(self) -> int:
        return self.tensor.shape[1 if self.transposed else 2]

    @property
    def out_features(self) -> int:
        return self.tensor.shape[2 if self.transposed else 1]

    @property
    def family(self) -> str:
        return type(self.module).__name__


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module built with transformers' ``use_experts_implementation``
    (its layout flags are set on the instance) holding 3-D parameters."""
    return (hasattr(module, "is_transposed") and hasattr(module, "has_gate")
            and any(p.dim() == 3 for p in module.parameters(recurse=False)))


def expert_banks(layer: nn.Module, layer_prefix: str, targets, ignore) -> dict[str, ExpertBank]:
    """Full name -> `ExpertBank` for the 3-D expert matrices of one decoder layer selected by
    ``targets``/``ignore`` (matched against the experts module's name or the parameter's name)."""
    banks = {}
    for sub_name, module in layer.named_modules():
        if not is_fused_experts(module):
            continue
        full_module = f"{layer_prefix}.{sub_name}" if sub_name else layer_prefix
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() != 3:
                continue
            full = f"{full_module}.{param_name}"
            if parameter_selected(full_module, full, targets, ignore):
                banks[full] = ExpertBank(full, module, param_name, bool(module.is_transposed))
    return banks


def expert_matrix(bank: ExpertBank, expert: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ``expert``'s matrix as ``[out, in]`` (a view of ``source``, by default the bank)."""
    tensor = bank.tensor if source is None else source
    matrix = tensor[expert]
    return matrix.T if bank.transposed else matrix


def set_expert_matrix(bank: ExpertBank, target: torch.Tensor, expert: int, value: torch.Tensor) -> None:
    """Write ``value`` (``[out, in]``) as expert ``expert``'s matrix into ``target`` (a bank-shaped tensor)."""
    with torch.no_grad():
        target[expert].copy_(value.T if bank.transposed else value)
