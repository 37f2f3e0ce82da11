"""How many units each channel group of a layer gives up for a structured sparsity.

``sparsity`` of a structured prune is the fraction of a decoder layer's Linear parameters
(weights and biases of attention and MLP; norms excluded) that is removed. Linears that cannot
shrink (OPT's attention) count in that total: the shrinkable groups remove the whole budget. Attention and MLP
share it like this, unless the config fixes a group's own fraction (``overrides`` on
``<layer>.self_attn`` or ``<layer>.mlp``) or excludes it (``ignore``):

- every group except the last free one (attention, whose units are coarse: whole KV groups)
  removes ``floor(sparsity * units)`` units, i.e. at most the layer's fraction;
- the last free group (the MLP, one channel per unit) removes what makes the layer total the
  nearest whole number of its units to ``sparsity * layer parameters``.

Every group keeps at least one unit. With ``channel_multiple`` > 1, MLP groups keep a multiple of
that many channels (the nearest to the exact count): matrix widths such as 1229 or 922 run as
slowly as much wider ones on CPU GEMM kernels (and GPU tensor cores want multiples of 8-64), so the
default rounds to 32. Groups with fewer channels than twice the multiple are not rounded.
"""

from __future__ import annotations

import math

from ..errors import PruningError
from .groups import ChannelGroup


def plan_removals(
    groups: list[ChannelGroup],
    sparsity: float,
    fixed: dict[str, float],
    excluded: set[str],
    layer_params: int | None = None,
    channel_multiple: int = 1,
) -> dict[str, int]:
    """Units to remove per group name; ``layer_params`` defaults to the groups' parameters."""
    removals: dict[str, int] = {}
    goal = sparsity * (layer_params if layer_params is not None else sum(group.params for group in groups))
    free = [g for g in groups if g.name not in fixed and g.name not in excluded]
    for group in groups:
        if group.name in excluded:
            removals[group.name] = 0
        elif group.name in fixed:
            removals[group.name] = min(round(fixed[group.name] * group.units), group.units - 1)
    for position, group in enumerate(free):
        if position < len(free) - 1:
            count = math.floor(sparsity * group.units + 1e-9)
        else:
            removed = sum(removals[g.name] * g.params_per_unit for g in groups if g.name in removals)
            count = round(max(goal - removed, 0.0) / group.params_per_unit)
        if count > group.units - 1:
            raise PruningError(
                f"{group.name}: structured sparsity {sparsity:g} would remove all {group.units} units; "
                f"lower the sparsity or let other modules share it."
            )
        removals[group.name] = count
    for group in groups:
        if group.kind == "mlp" and removals[group.name]:
            removals[group.name] = group.units - round_kept(group.units - removals[group.name], group.units, channel_multiple)
    return removals


def round_kept(kept: int, units: int, multiple: int, allow_full: bool = False) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (at least one multiple); unchanged
    when ``multiple`` is 1 or the group has fewer than ``2 * multiple`` units.

    A count that rounds up to the whole group stays as it is (a uniform prune must still remove
    something from every layer), unless ``allow_full``: a global allocation may leave a layer whole.
    """
    if multiple <= 1 or units < 2 * multiple:
        return kept
    rounded = max(multiple, int(math.floor(kept / multiple + 0.5)) * multiple)
    if rounded < units:
        return rounded
    return units if allow_full else kept
