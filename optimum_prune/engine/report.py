"""`PruneReport`: what a prune did, as the engines measure it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from ..structure.layers import summarize_names


@dataclass
class PruneReport:
    """What a prune did: measured sparsity per Linear and overall, and how long it took."""

    sparsity: dict[str, float] = field(default_factory=dict)
    pruned_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    layer_weights: int = 0  # weights in every matrix of the decoder layers (biases aside); 0: not measured
    covered_weights: int = 0  # of those, the ones in tensors the prune targeted
    # the rest, by name -> weights: no pruning path handles them / routers and gates (left out on
    # purpose) / left out by targets and ignore; covered + these = layer_weights (when measured)
    unhandled: dict[str, int] = field(default_factory=dict)
    routers: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    expert_matrices: int = 0  # expert matrices of fused MoE banks pruned (each its own problem)
    expert_fallbacks: dict[str, int] = field(default_factory=dict)  # expert bank -> experts pruned by magnitude
    removed_experts: dict[str, list[int]] = field(default_factory=dict)  # MoE block -> indices of the experts removed
    layer_sparsity: list[float] | None = None  # each decoder layer's target under a sparsity profile (None: uniform)
    layer_patterns: list[str] | None = None  # each decoder layer's N:M pattern or "dense" (mixed patterns)
    removed_layers: list[int] = field(default_factory=list)  # depth pruning: indices of the decoder layers removed
    layer_influence: list[float] | None = None  # depth pruning: each decoder layer's measured influence
    # depth pruning at block granularity: the blocks left out of layers that stay (``model.layers.3.self_attn``),
    # and each block's influence ("attention" / "mlp" -> one value per decoder layer)
    removed_blocks: list[str] = field(default_factory=list)
    block_influence: dict[str, list[float]] = field(default_factory=dict)
    unit_scores: dict[str, float] = field(default_factory=dict)  # depth pruning: what ranked each unit (name -> score)
    # channel groups whose least-squares re-fit was declined under ``max_restore_growth`` (the consumer kept its
    # kept columns): group -> the declined re-fit's Frobenius norm over the dense consumer's
    declined_refits: dict[str, float] = field(default_factory=dict)
    # "statistics" / "solve" / "forward" -> seconds of this run (like ``seconds``, not in to_dict: a
    # resumed run times only the layers it ran)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the time the block takes to ``phase_seconds[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    def record(self, name: str, pruned: int, total: int) -> None:
        """``pruned`` of the ``total`` weights of tensor ``name`` were zeroed."""
        self.sparsity[name] = pruned / total
        self.pruned_params += pruned
        self.total_params += total

    @property
    def overall_sparsity(self) -> float:
        """Zeros made among the weights the prune targeted (see `coverage` for how many those are)."""
        return self.pruned_params / max(self.total_params, 1)

    @property
    def coverage(self) -> float | None:
        """Share of the decoder layers' matrix weights in tensors the prune targeted (None: not measured)."""
        return self.covered_weights / self.layer_weights if self.layer_weights else None

    def unhandled_note(self, prefix: str) -> str | None:
        """One line naming the matrices that stayed dense because nothing can prune them, or None."""
        if not self.unhandled or not self.layer_weights:
            return None
        count, shown = sum(self.unhandled.values()), _listed(self.unhandled, prefix)
        return (f"{count:,} weights ({count / self.layer_weights:.1%} of the decoder layers' weights) sit in tensors "
                f"optimum-prune cannot prune yet and stay dense: {shown}; the sparsity counts only the targeted "
                f"weights (leave them out with ignore=[...] / --ignore to silence this).")

    def left_out_note(self, prefix: str) -> str | None:
        """One line naming the matrices left dense on purpose (routers and gates) and by the
        config's targets / ignore, with their share of the decoder layers' weights; None if none."""
        parts = []
        for what, names in (("routers and gates, on purpose", self.routers), ("by targets / ignore", self.ignored)):
            if names and self.layer_weights:
                count = sum(names.values())
                parts.append(f"{count:,} weights ({count / self.layer_weights:.1%}) {what}: {_listed(names, prefix)}")
        return "left dense: " + "; ".join(parts) if parts else None

    def to_dict(self) -> dict:
        return {"sparsity": dict(self.sparsity), "pruned_params": self.pruned_params, "total_params": self.total_params,
                "layer_weights": self.layer_weights, "covered_weights": self.covered_weights,
                "unhandled": dict(self.unhandled), "routers": dict(self.routers), "ignored": dict(self.ignored),
                "expert_matrices": self.expert_matrices,
                "expert_fallbacks": dict(self.expert_fallbacks), "removed_experts": dict(self.removed_experts),
                "layer_sparsity": self.layer_sparsity, "layer_patterns": self.layer_patterns,
                "declined_refits": dict(self.declined_refits)}

    def load_dict(self, data: dict) -> None:
        self.sparsity = dict(data["sparsity"])
        self.pruned_params, self.total_params = int(data["pruned_params"]), int(data["total_params"])
        self.layer_weights = int(data.get("layer_weights", self.layer_weights))
        self.covered_weights = int(data.get("covered_weights", self.covered_weights))
        self.unhandled = dict(data.get("unhandled", self.unhandled))
        self.routers = dict(data.get("routers", self.routers))
        self.ignored = dict(data.get("ignored", self.ignored))
        self.expert_matrices = int(data.get("expert_matrices", self.expert_matrices))
        self.expert_fallbacks = dict(data.get("expert_fallbacks", self.expert_fallbacks))
        self.removed_experts = {k: list(v) for k, v in data.get("removed_experts", self.removed_experts).items()}
        self.layer_sparsity = data.get("layer_sparsity", self.layer_sparsity)
        self.layer_patterns = data.get("layer_patterns", self.layer_patterns)
        self.declined_refits = {k: float(v) for k, v in data.get("declined_refits", self.declined_refits).items()}


def _listed(names, prefix: str, most: int = 4) -> str:
    """Tensor names across layers for a message, the layer index as ``*``: the first ``most``, then
    how many more."""
    shown = summarize_names(names, prefix)
    return ", ".join(shown[:most]) + (f" and {len(shown) - most} more" if len(shown) > most else "")
