"""Global heterogeneous structural pruning by policy gradient over Bernoulli masks.

Every prunable unit of the whole model (MLP channels, attention KV groups) gets a keep
probability ``s_u``. Each step samples ``K`` masks ``m_k ~ Bernoulli(s)``, runs the masked model
forward on a calibration batch (no backpropagation: the model's weights get no gradient) and
moves ``s`` with the score-function estimator

    g = 1/K sum_k (loss_k - b) (m_k - s) / (s (1 - s)),      b: moving average of the losses,

by SGD with a cosine learning-rate schedule, then projects ``s`` back onto the parameter budget
(a bisection on the shift ``lambda`` of ``clip(s - lambda c, eps, 1 - eps)``, ``c`` the parameters
of each unit; one budget per module type, or one global budget) and clips it away from 0 and 1.
``s`` starts from Wanda-sp scores (normalised within each group, mapped through a sigmoid and
projected). The final mask keeps the units of highest probability under the exact budget, at
least one per group; the consumers can then be re-fitted by least squares on the kept channels
(FASP's restoration). Layers end up with different widths: the model is saved through
``optimum_prune.modeling``.

The method itself is pure optimisation: the engine (``calibration/global_engine.py``) gives it
the units, their costs and initial scores, and a function that returns the loss of each sampled
mask; it never sees hooks or the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import PruningError, check_choice, check_int, check_positive_number
from ..registry import register_method
from .base import PruningMethod
from ..structure.budget import round_kept
from .structured import restore_units
from .wanda_sp import wanda_sp_scores


@dataclass
class PolicyGradientOptions:
    #: SGD steps; each runs ``samples`` masked forward passes on ``windows_per_step`` windows.
    steps: int = 200
    samples: int = 2
    windows_per_step: int = 1
    #: Peak learning rate of the cosine schedule (probabilities live in [eps, 1 - eps]).
    lr: float = 0.002
    #: Loss baseline: "moving" (moving average of the step losses, factor ``baseline_decay``) or
    #: "leave-one-out" (for each sample, the mean loss of the other samples of the same step: they
    #: share the calibration batch, so the batch's own difficulty cancels; needs samples >= 2).
    baseline: str = "leave-one-out"
    baseline_decay: float = 0.9
    #: "separate": attention and MLP each lose ``sparsity`` of their parameters; "global": one budget.
    budget: str = "separate"
    #: Probabilities are kept in [eps, 1 - eps].
    eps: float = 0.01
    #: Initial probabilities: "wanda-sp" scores, or "uniform" (every unit the same probability).
    init: str = "wanda-sp"
    #: Sharpness of the initial mapping from Wanda-sp scores to probabilities (larger: closer to 0/1).
    init_temperature: float = 1.0
    #: Where each channel group starts, i.e. which Wanda-sp score is its 0.5 point: "group" (its own
    #: median: every layer starts at the same width), "budget" (scores per parameter against the
    #: median of all units sharing the budget: layers whose units score low start thinner) or
    #: "sensitivity" (measured with forward passes: each group in turn loses its lowest-scoring
    #: ``sparsity`` share, the loss increase ``d_g`` over the unmasked model on the same batch is its
    #: sensitivity, and group g starts removing a share proportional to its parameters / ``d_g``,
    #: the minimiser of ``sum_g d_g (r_g / sparsity)^2`` under the budget, at most twice ``sparsity``).
    init_scope: str = "group"
    #: Batches of ``windows_per_step`` windows the sensitivity of every group is averaged over.
    sensitivity_rounds: int = 4
    #: Re-fit each consumer on its kept channels by least squares (FASP's restoration).
    restore: bool = True
    #: Restore layer by layer on the inputs of the already-pruned layers (as the layer-wise methods
    #: calibrate; one more pass over the calibration data); false: on the dense model's statistics.
    sequential: bool = True
    #: None: keep the units of highest probability. A layer-wise structured method ("fasp", "spap",
    #: "wanda-sp"): keep the width the policy learned for every channel group but let that method
    #: choose the units and restore, layer by layer (global allocation, local solver).
    local_method: str | None = None

    def __post_init__(self):
        for name in ("steps", "samples", "windows_per_step", "sensitivity_rounds"):
            check_int(getattr(self, name), f"policy_gradient option {name}", 1 if name != "steps" else 0)
        for name in ("lr", "init_temperature"):
            check_positive_number(getattr(self, name), f"policy_gradient option {name}")
        check_choice(self.budget, "policy_gradient option budget", ("separate", "global"))
        check_choice(self.init, "policy_gradient option init", ("wanda-sp", "uniform"))
        check_choice(self.init_scope, "policy_gradient option init_scope", ("group", "budget", "sensitivity"))
        check_choice(self.baseline, "policy_gradient option baseline", ("moving", "leave-one-out"))
        if self.baseline == "leave-one-out" and self.samples < 2:
            raise PruningError("policy_gradient baseline 'leave-one-out' needs samples >= 2; raise samples or use 'moving'.")
        if not (isinstance(self.baseline_decay, (int, float)) and 0 <= self.baseline_decay < 1):
            raise PruningError(f"policy_gradient option baseline_decay must be in [0, 1), got {self.baseline_decay!r}.")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 0.5):
            raise PruningError(f"policy_gradient option eps must be in (0, 0.5), got {self.eps!r}.")
        for name in ("restore", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise PruningError(f"policy_gradient option {name} must be true or false, got {getattr(self, name)!r}.")
        if self.local_method is not None:
            from ..registry import get_method

            method = get_method(self.local_method)  # unknown name: PruningError listing the methods
            if "structured" not in method.supported_patterns or getattr(method, "is_global", False):
                raise PruningError(f"policy_gradient option local_method must be a layer-wise structured method "
                                   f"(fasp, spap, wanda-sp), got {self.local_method!r}.")

    @property
    def layerwise_finish(self) -> bool:
        """Whether the final widths go through a layer-wise pass (sequential restoration or a local method)."""
        return self.local_method is not None or (self.restore and self.sequential)


@dataclass
class GlobalProblem:
    """Every prunable unit of the model, grouped as the engine's channel groups."""

    kinds: list[str]  # per group: "mlp" | "attention"
    unit_params: list[int]  # per group: parameters removed with one unit
    scores: list[torch.Tensor]  # per group: initial importance of each unit
    sparsity: float  # fraction of the groups' parameters to remove
    #: masks (one float tensor K x units per group) -> per-mask language-model loss (K,)
    evaluate: Callable[[list[torch.Tensor]], torch.Tensor]
    progress: bool = False
    seed: int = 0
    channel_multiple: int = 1  # MLP groups keep a multiple of this many units (see structure/budget.py)
    history: list = field(default_factory=list)


def project_to_budget(y: torch.Tensor, cost: torch.Tensor, keep_params: float, eps: float) -> torch.Tensor:
    """``clip(y - lambda, eps, 1 - eps)`` with the shift ``lambda`` found by bisection so that
    ``sum(cost * s) = keep_params``: the projection onto the budget within the box in the metric
    ``sum_u cost_u (s_u - y_u)^2``. Every unit moves by the same shift, whatever it costs (the plain
    Euclidean projection would shift a unit by ``lambda * cost``: with a global budget a KV group,
    hundreds of times an MLP channel's parameters, would be pushed to ``eps`` before any step).
    With equal costs (one budget per module type) both projections coincide."""
    def kept(lam):
        return float((cost * (y - lam).clamp(eps, 1 - eps)).sum())

    lo, hi = float(y.min()) - 1.0, float(y.max()) + 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if kept(mid) > keep_params:
            lo = mid
        else:
            hi = mid
    return (y - 0.5 * (lo + hi)).clamp(eps, 1 - eps)


def final_keep(s: torch.Tensor, cost: torch.Tensor, keep_params: float) -> torch.Tensor:
    """Highest probabilities first while they fit in ``keep_params`` (exactly ``k`` when costs are equal)."""
    order = torch.argsort(s, descending=True, stable=True)
    within = torch.cumsum(cost[order], 0) <= keep_params + 1e-6
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[order[within]] = True
    return keep


@register_method("policy_gradient", aliases=("pg",))
class PolicyGradient(PruningMethod):
    Options = PolicyGradientOptions
    supported_patterns = ("structured",)
    is_global = True

    @property
    def statistics(self):
        """Of the dense model's consumers: norms for the scores, Grams for a one-pass restoration."""
        one_pass_restore = self.options.restore and not self.options.layerwise_finish
        return frozenset({"sq_norm", "gram"}) if one_pass_restore else frozenset({"sq_norm"})

    producer_statistics = frozenset({"sq_norm"})  # Wanda-sp scores of the producer rows

    def unit_scores(self, problem):
        return wanda_sp_scores(problem)

    def restore(self, problem, keep):
        if not self.options.restore:
            return None
        return restore_units(problem, keep, self.dampening)

    # ------------------------------------------------------------------ the optimisation
    def _partitions(self, problem, group_of):
        if self.options.budget == "global":
            return [torch.ones_like(group_of, dtype=torch.bool)]
        kind_ids = {kind: i for i, kind in enumerate(dict.fromkeys(problem.kinds))}
        per_unit_kind = torch.tensor([kind_ids[kind] for kind in problem.kinds])[group_of]
        return [per_unit_kind == i for i in kind_ids.values()]

    def _sensitivity_shares(self, problem: GlobalProblem, sizes, partitions, group_of, chunk: int = 7) -> list[float]:
        """Per group, the share of its units to remove at the start (see ``init_scope``)."""
        groups = len(sizes)
        drops = []
        for g, n in enumerate(sizes):  # group g without its lowest-scoring `sparsity` share
            remove = min(n - 1, max(1, round(problem.sparsity * n)))
            mask = torch.ones(n)
            mask[torch.argsort(problem.scores[g].double(), stable=True)[:remove]] = 0
            drops.append((mask, remove / n))
        damage = torch.zeros(groups, dtype=torch.float64)
        for _ in range(self.options.sensitivity_rounds):
            for start in range(0, groups, chunk):
                members = list(range(start, min(groups, start + chunk)))
                # sample 0: the unmasked model; sample i: only group members[i - 1] masked (same batch)
                masks = [torch.stack([torch.ones(n)] + [drops[h][0] if h == j else torch.ones(n) for j in members])
                         for h, n in enumerate(sizes)]
                losses = problem.evaluate(masks).double()
                damage[members] += losses[1:] - losses[0]
        damage /= self.options.sensitivity_rounds
        floor = max(float(damage[damage > 0].median()) * 1e-2, 1e-9) if bool((damage > 0).any()) else 1e-9
        damage = damage.clamp_min(floor)
        params = torch.tensor([n * c for n, c in zip(sizes, problem.unit_params)], dtype=torch.float64)
        base = torch.tensor([share for _, share in drops], dtype=torch.float64)
        # the quadratic model is trusted up to twice the measured share (beyond it the damage of a
        # layer grows faster: measured on SmolLM2, uncapped shares emptied layers for nothing)
        cap = torch.minimum(torch.tensor([1 - 1 / n for n in sizes], dtype=torch.float64), 2 * base)
        shares = torch.zeros(groups, dtype=torch.float64)
        group_ids = torch.arange(groups)
        for part in partitions:
            members = group_ids[torch.tensor([bool(part[group_of == g].any()) for g in range(groups)])]
            target = problem.sparsity * float(params[members].sum())
            weight = base[members] ** 2 * params[members] / damage[members]  # r_g = a * weight_g, capped

            def removed(a):
                return float((torch.minimum(a * weight, cap[members]) * params[members]).sum())

            lo, hi = 0.0, 1.0
            while removed(hi) < target and hi < 1e30:
                hi *= 2
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
            shares[members] = torch.minimum(hi * weight, cap[members])
        self.sensitivity, self.initial_shares = damage.float(), shares.float()  # for inspection
        return shares.tolist()

    @torch.no_grad()
    def optimise(self, problem: GlobalProblem) -> list[torch.Tensor]:
        """Boolean keep mask per group."""
        opts = self.options
        sizes = [len(scores) for scores in problem.scores]
        group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        cost = torch.repeat_interleave(torch.tensor(problem.unit_params, dtype=torch.float64), torch.tensor(sizes))
        partitions = self._partitions(problem, group_of)
        # initial probabilities: log-scores (per parameter) centred within each group or each
        # budget partition, through a sigmoid
        log_scores = torch.cat([torch.log((scores.double() / params).clamp_min(1e-12))
                                for scores, params in zip(problem.scores, problem.unit_params)])
        centre = torch.empty_like(log_scores)
        if opts.init_scope == "sensitivity" and opts.init == "wanda-sp":  # a uniform start ignores the centres
            shares = self._sensitivity_shares(problem, sizes, partitions, group_of)
            for g, share in enumerate(shares):
                members = group_of == g
                centre[members] = torch.quantile(log_scores[members], float(share))
        else:
            scopes = partitions if opts.init_scope == "budget" else [group_of == g for g in range(len(sizes))]
            for scope in scopes:
                centre[scope] = log_scores[scope].median()
        logits = (log_scores - centre) * opts.init_temperature
        y = torch.sigmoid(logits) if opts.init == "wanda-sp" else torch.full_like(logits, 0.5)
        budgets = [(1 - problem.sparsity) * float(cost[p].sum()) for p in partitions]

        def project(values):
            out = values.clone()
            for part, keep_params in zip(partitions, budgets):
                out[part] = project_to_budget(values[part], cost[part], keep_params, opts.eps)
            return out

        s = project(y)
        generator = torch.Generator().manual_seed(problem.seed)
        baseline = None
        bar = tqdm(range(opts.steps), desc="policy gradient", disable=not problem.progress)
        for step in bar:
            masks = torch.bernoulli(s.expand(opts.samples, -1), generator=generator)
            losses = problem.evaluate([m.float() for m in masks.split(sizes, dim=1)]).double()
            mean = float(losses.mean())
            baseline = mean if baseline is None else opts.baseline_decay * baseline + (1 - opts.baseline_decay) * mean
            if opts.baseline == "leave-one-out":
                advantage = (losses - mean) * opts.samples / (opts.samples - 1)  # loss_k - mean of the others
            else:
                advantage = losses - baseline
            grad = (advantage[:, None] * (masks - s) / (s * (1 - s))).mean(0)
            lr = opts.lr * 0.5 * (1 + math.cos(math.pi * step / max(opts.steps, 1)))
            s = project(s - lr * grad)
            problem.history.append({"step": step, "loss": mean, "baseline": baseline, "lr": lr})
            bar.set_postfix(loss=f"{mean:.4f}")
        keep = torch.zeros_like(s, dtype=torch.bool)
        for part, keep_params in zip(partitions, budgets):
            keep[part] = final_keep(s[part], cost[part], keep_params)
        # hardware-friendly widths: each MLP group keeps its most probable units, a multiple of channel_multiple
        for g in range(len(sizes)):
            if problem.kinds[g] != "mlp":
                continue
            members = (group_of == g).nonzero().squeeze(1)
            kept = int(keep[members].sum())
            target = round_kept(kept, len(members), problem.channel_multiple) if kept else 0
            if target != kept:
                keep[members] = False
                keep[members[torch.argsort(s[members], descending=True, stable=True)[:target]]] = True
        # every group keeps at least one unit: its most probable one, paid for by the least probable kept unit
        for g in range(len(sizes)):
            members = (group_of == g).nonzero().squeeze(1)
            if not keep[members].any():
                keep[members[s[members].argmax()]] = True
                same_part = next(p for p in partitions if p[members[0]])
                others = (keep & same_part & (group_of != g)).nonzero().squeeze(1)
                if others.numel():
                    keep[others[s[others].argmin()]] = False
        self.probabilities = [p.float() for p in s.split(sizes)]
        return list(keep.split(sizes))
