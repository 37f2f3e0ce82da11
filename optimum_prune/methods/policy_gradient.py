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

The method itself is pure optimisation: the engine (``engine/global_search.py``) gives it
the units, their costs and initial scores, and a function that returns the loss of each sampled
mask; it never sees hooks or the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from ..allocation import allocate, bisect_shift, shift_into_budget
from ..errors import PruningError, check_choice, check_int, check_positive_number
from .base import PruningMethod
from ..structure.budget import round_kept
from .structured import GlobalProblem, LeastSquaresRestore
from .wanda_sp import wanda_sp_scores

#: Decode time per generated token (ms) of SmolLM2-135M in transformers (fp32, 2 threads, x86_64), fitted to
#: docs/results/depth.md's speed rows: per million parameters, and beside its parameters each removed
#: decoder layer, attention block and MLP block (docs/results/README.md, the per-block cost model).
LATENCY_MODEL = {"per_million": 0.098, "layer": 1.9, "attention": 1.1, "mlp": 0.55}


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
    #: Default: "separate" for channels alone, "global" with ``blocks`` (the only one they allow).
    budget: str | None = None
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
    #: ``level * sparsity`` share, for each of ``sensitivity_levels``; the loss increases over the
    #: unmasked model on the same batch are its damage curve, and the groups start at the shares
    #: that minimise the summed damage under the budget).
    init_scope: str = "group"
    #: Batches of ``windows_per_step`` windows the sensitivity of every group is averaged over.
    sensitivity_rounds: int = 4
    #: Shares each group loses in the sensitivity probes, as multiples of ``sparsity``. Several: the
    #: measured damage points are joined linearly (convexified) and no group starts beyond the
    #: largest level. One (a quarter of the passes): the damage is taken as quadratic in the share,
    #: up to twice it.
    sensitivity_levels: list = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    #: Re-fit each consumer on its kept channels by least squares (FASP's restoration).
    restore: bool = True
    #: Restore layer by layer on the inputs of the already-pruned layers (as the layer-wise methods
    #: calibrate; one more pass over the calibration data); false: on the dense model's statistics.
    sequential: bool = True
    #: A re-fitted consumer whose Frobenius norm would exceed this many times the dense consumer's
    #: keeps its kept columns as they are (None: every consumer re-fitted). The search may drop a unit
    #: that carries most of a layer's output because the loss does not need it; rebuilding that
    #: output by least squares amplifies the kept inputs and breaks the model. 2.0: re-fits slightly above
    #: the dense norm are needed (1.0 cost SmolLM2's channel search 1.16x in perplexity), the harmful one
    #: measured grew 2.55x (docs/results/README.md, policy gradient over channels and blocks).
    max_restore_growth: float | None = 2.0
    #: None: keep the units of highest probability. A layer-wise structured method ("fasp", "spap",
    #: "wanda-sp"): keep the width the policy learned for every channel group but let that method
    #: choose the units and restore, layer by layer (global allocation, local solver).
    local_method: str | None = None
    #: Depth units gated beside the channels: "none", "layer" (whole decoder layers), "attention" /
    #: "mlp" (those blocks of every layer) or "block" (both, each gated alone). A gate is one more
    #: Bernoulli unit; the budget counts a kept unit's channels only while its gate is on.
    blocks: str = "none"
    #: Initial keep probability of the gate of median score; gates of higher score start higher
    #: (``init_temperature`` sets how much, on the log of the score).
    block_start: float = 0.95
    #: What scores the gates for their start: "influence" (1 - cosine of the residual stream around the
    #: unit, one pass) or "loss" (the calibration loss increase when the unit alone is removed, one pass
    #: over ``block_score_samples`` windows per gate, as ``block-influence[score="loss"]`` ranks; a unit
    #: whose removal does not raise the loss scores as the least harmful one that does).
    block_score: str = "influence"
    block_score_samples: int = 8
    #: False: the gates alone are searched (depth only, the paper's layer granularity by itself):
    #: every channel of a kept layer or block stays, and the budget is met by the gates, the least
    #: probable first, each while at least half of it fits (as ``block-influence`` meets it).
    channels: bool = True
    #: What the budget counts: "params" (the parameters kept) or "latency" (the decode time of
    #: ``latency_model``; needs ``blocks``): ``sparsity`` is then the share of the modelled decode time
    #: of the decoder layers to remove. A removed block saves its fixed cost beside its parameters',
    #: so the search trades channels against blocks by time, not by size.
    cost: str = "params"
    #: ms per generated token: "per_million" parameters, and the fixed cost of a removed "layer",
    #: "attention" or "mlp" block beside its parameters (keys left out take LATENCY_MODEL's values).
    latency_model: dict = field(default_factory=lambda: dict(LATENCY_MODEL))

    def __post_init__(self):
        for name in ("steps", "samples", "windows_per_step", "sensitivity_rounds", "block_score_samples"):
            check_int(getattr(self, name), f"policy_gradient option {name}", 1 if name != "steps" else 0)
        for name in ("lr", "init_temperature"):
            check_positive_number(getattr(self, name), f"policy_gradient option {name}")
        check_choice(self.blocks, "policy_gradient option blocks", ("none", "layer", "attention", "mlp", "block"))
        if self.budget is None:
            self.budget = "separate" if self.blocks == "none" else "global"
        check_choice(self.budget, "policy_gradient option budget", ("separate", "global"))
        if self.blocks != "none" and self.budget != "global":
            raise PruningError("policy_gradient option blocks needs one global budget (a layer holds attention and MLP "
                               "parameters); drop budget or set budget='global'.")
        if not (isinstance(self.block_start, (int, float)) and 0 < self.block_start < 1):
            raise PruningError(f"policy_gradient option block_start must be in (0, 1), got {self.block_start!r}.")
        check_choice(self.block_score, "policy_gradient option block_score", ("influence", "loss"))
        check_choice(self.init, "policy_gradient option init", ("wanda-sp", "uniform"))
        check_choice(self.init_scope, "policy_gradient option init_scope", ("group", "budget", "sensitivity"))
        check_choice(self.baseline, "policy_gradient option baseline", ("moving", "leave-one-out"))
        levels = self.sensitivity_levels
        if (not isinstance(levels, (list, tuple)) or not levels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in levels)
                or max(levels) < 1):
            raise PruningError("policy_gradient option sensitivity_levels must be a list of positive multiples of the "
                               f"sparsity, the largest at least 1 (e.g. [0.5, 1, 1.5, 2]); got {levels!r}.")
        self.sensitivity_levels = [float(v) for v in levels]
        if self.baseline == "leave-one-out" and self.samples < 2:
            raise PruningError("policy_gradient baseline 'leave-one-out' needs samples >= 2; raise samples or use 'moving'.")
        if not (isinstance(self.baseline_decay, (int, float)) and 0 <= self.baseline_decay < 1):
            raise PruningError(f"policy_gradient option baseline_decay must be in [0, 1), got {self.baseline_decay!r}.")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 0.5):
            raise PruningError(f"policy_gradient option eps must be in (0, 0.5), got {self.eps!r}.")
        if self.channels is False and self.blocks == "none":
            raise PruningError("policy_gradient option channels=false searches the gates alone; set blocks (layer, "
                               "attention, mlp or block).")
        for name in ("restore", "sequential", "channels"):
            if not isinstance(getattr(self, name), bool):
                raise PruningError(f"policy_gradient option {name} must be true or false, got {getattr(self, name)!r}.")
        if self.max_restore_growth is not None:
            check_positive_number(self.max_restore_growth, "policy_gradient option max_restore_growth")
        self._check_cost()
        if self.local_method is not None and not isinstance(self.local_method, str):
            raise PruningError(f"policy_gradient option local_method must be a method name (fasp, spap, wanda-sp), "
                               f"got {self.local_method!r}.")

    def _check_cost(self):
        check_choice(self.cost, "policy_gradient option cost", ("params", "latency"))
        if self.cost == "latency" and self.blocks == "none":
            raise PruningError("policy_gradient option cost='latency' needs blocks (layer, attention, mlp or block): "
                               "without depth gates the time a model can lose is its parameters' share alone.")
        model = self.latency_model
        if not isinstance(model, dict) or not set(model) <= set(LATENCY_MODEL) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in model.values()):
            raise PruningError(f"policy_gradient option latency_model must map some of {sorted(LATENCY_MODEL)} to "
                               f"non-negative ms per token, e.g. {LATENCY_MODEL}; got {model!r}.")
        self.latency_model = {**LATENCY_MODEL, **{k: float(v) for k, v in model.items()}}
        if self.latency_model["per_million"] <= 0:
            raise PruningError("policy_gradient option latency_model's per_million must be positive.")

    @property
    def layerwise_finish(self) -> bool:
        """Whether the final widths go through a layer-wise pass (sequential restoration or a local method)."""
        return self.local_method is not None or (self.restore and self.sequential)


def project_to_budget(y: torch.Tensor, cost: torch.Tensor, keep_params: float, eps: float) -> torch.Tensor:
    """``clip(y - lambda, eps, 1 - eps)`` with the shift ``lambda`` found by bisection so that
    ``sum(cost * s) = keep_params``: the projection onto the budget within the box in the metric
    ``sum_u cost_u (s_u - y_u)^2``. Every unit moves by the same shift, whatever it costs (the plain
    Euclidean projection would shift a unit by ``lambda * cost``: with a global budget a KV group,
    hundreds of times an MLP channel's parameters, would be pushed to ``eps`` before any step).
    With equal costs (one budget per module type) both projections coincide."""
    return shift_into_budget(y, cost, keep_params, eps, 1 - eps)


def final_keep(s: torch.Tensor, cost: torch.Tensor, keep_params: float) -> torch.Tensor:
    """Highest probabilities first while they fit in ``keep_params`` (exactly ``k`` when costs are equal)."""
    order = torch.argsort(s, descending=True, stable=True)
    within = torch.cumsum(cost[order], 0) <= keep_params + 1e-6
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[order[within]] = True
    return keep


def round_widths(keep: torch.Tensor, s: torch.Tensor, group_of: torch.Tensor, groups: list[int],
                 multiple: int) -> torch.Tensor:
    """Hardware-friendly widths: each of ``groups`` keeps its most probable units, a multiple of
    ``multiple`` (its whole width included) nearest to the count ``keep`` gives it."""
    keep = keep.clone()
    for g in groups:
        members = (group_of == g).nonzero().squeeze(1)
        kept = int(keep[members].sum())
        target = round_kept(kept, len(members), multiple, allow_full=True) if kept else 0
        if target != kept:
            keep[members] = False
            keep[members[torch.argsort(s[members], descending=True, stable=True)[:target]]] = True
    return keep


class PolicyGradient(LeastSquaresRestore, PruningMethod):
    name = "policy_gradient"
    aliases = ("pg",)
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

    def finishing_step(self) -> tuple[str, bool, dict]:
        """FASP's least squares on the learned units (within ``max_restore_growth``), or
        ``local_method`` choosing the units of the learned widths itself."""
        if self.options.local_method is not None:
            return self.options.local_method, False, {}
        return "fasp", True, {"max_restore_growth": self.options.max_restore_growth}

    @classmethod
    def delegated_methods(cls, options) -> dict[str, str]:
        return {} if options.local_method is None else {"local_method": options.local_method}

    # ------------------------------------------------------------------ the optimisation
    def _partitions(self, problem, group_of):
        if self.options.budget == "global":
            return [torch.ones_like(group_of, dtype=torch.bool)]
        kind_ids = {kind: i for i, kind in enumerate(dict.fromkeys(problem.kinds))}
        per_unit_kind = torch.tensor([kind_ids[kind] for kind in problem.kinds])[group_of]
        return [per_unit_kind == i for i in kind_ids.values()]

    def _sensitivity_shares(self, problem: GlobalProblem, sizes, partitions, group_of, chunk: int = 7) -> list[float]:
        """Per group, the share of its units to remove at the start (see ``init_scope``).

        Each probe masks one group's lowest-scoring units (a measured level) and nothing else; a
        round runs every probe on the same batch, ``chunk`` probes and the unmasked model per call,
        so the damage (the loss increase) of every group is measured on the same windows. The
        damage curves are then allocated by equal marginal damage per parameter (``allocate``)."""
        levels = sorted(set(self.options.sensitivity_levels))
        probes, points = [], []  # probes: (group, point index); points[g]: removed shares measured
        for g, n in enumerate(sizes):
            counts = sorted({min(n - 1, max(1, round(level * problem.sparsity * n))) for level in levels})
            points.append([count / n for count in counts])
            probes += [(g, i) for i in range(len(counts))]
        order = [torch.argsort(scores.double(), stable=True) for scores in problem.scores]
        damage = [torch.zeros(len(p), dtype=torch.float64) for p in points]
        calls = [(round_index, start) for round_index in range(self.options.sensitivity_rounds)
                 for start in range(0, len(probes), chunk)]
        for round_index, start in tqdm(calls, desc="sensitivity", disable=not problem.progress):
            members = probes[start:start + chunk]
            # sample 0: the unmasked model; sample i: only probe i's group masked (same batch)
            masks = [torch.ones(len(members) + 1, n) for n in sizes]
            for i, (g, p) in enumerate(members, start=1):
                masks[g][i, order[g][:round(points[g][p] * sizes[g])]] = 0
            losses = problem.evaluate(masks, batch_index=round_index).double()
            for i, (g, p) in enumerate(members, start=1):
                damage[g][p] += (losses[i] - losses[0]) / self.options.sensitivity_rounds
        if len(levels) == 1:  # one measured share: damage assumed quadratic in the share, up to twice it
            curves = self._quadratic_curves(points, damage, sizes)
        else:  # the measured points, joined linearly
            curves = [(torch.tensor(r, dtype=torch.float64), d) for r, d in zip(points, damage)]
        params = torch.tensor([n * c for n, c in zip(sizes, problem.unit_params)], dtype=torch.float64)
        shares = torch.zeros(len(sizes), dtype=torch.float64)
        for part in partitions:
            members = [g for g in range(len(sizes)) if bool(part[group_of == g].any())]
            target = problem.sparsity * float(params[members].sum())
            for g, share in zip(members, allocate([curves[g] for g in members], params[members], target)):
                shares[g] = share
        nearest = min(range(len(levels)), key=lambda i: abs(levels[i] - 1))  # for inspection: damage at `sparsity`
        self.sensitivity = torch.stack([d[min(nearest, len(d) - 1)] for d in damage]).float()
        self.initial_shares = shares.float()
        return shares.tolist()

    @staticmethod
    def _quadratic_curves(points, damage, sizes, steps: int = 8):
        """``d(r) = d_1 (r / r_1)^2`` sampled up to ``2 r_1`` (beyond it a layer's damage grows faster:
        measured on SmolLM2, an uncapped quadratic model emptied layers for nothing). Damage at or
        below zero (noise on a group that does not matter) counts as 1% of the median positive one."""
        measured = torch.stack([d[0] for d in damage])
        positive = measured[measured > 0]
        floor = max(float(positive.median()) * 1e-2, 1e-9) if positive.numel() else 1e-9
        curves = []
        for (r1,), d1, n in zip(points, measured.clamp_min(floor).tolist(), sizes):
            r = torch.linspace(2 * r1 / steps, 2 * r1, steps, dtype=torch.float64).clamp_max(1 - 1 / n).unique()
            curves.append((r, d1 * (r / r1) ** 2))
        return curves

    @torch.no_grad()
    def _initial_probabilities(self, problem: GlobalProblem, sizes, partitions, group_of) -> torch.Tensor:
        """Log-scores (per parameter) centred within each group or each budget partition (or at each
        group's measured sensitivity share), through a sigmoid; 0.5 everywhere for a uniform start."""
        opts = self.options
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
        return y

    def optimise(self, problem: GlobalProblem) -> list[torch.Tensor]:
        """Boolean keep mask per group (all false under a gate that is off); ``kept_gates``: the gates kept."""
        opts = self.options
        sizes = [len(scores) for scores in problem.scores]
        group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # every cost in the budget's count (parameters, or ms per token: see _per_parameter)
        cost = torch.repeat_interleave(torch.tensor(problem.unit_params, dtype=torch.float64),
                                       torch.tensor(sizes)) * self._per_parameter()
        latency = opts.cost == "latency"
        if not opts.channels:
            return self._optimise_gates(problem, sizes, group_of, cost)
        partitions = self._partitions(problem, group_of)
        # a resumed search starts from its saved probabilities: the start (sensitivity probes) is not measured again
        y = None if problem.resume else self._initial_probabilities(problem, sizes, partitions, group_of)
        gated = bool(problem.gates)
        if gated:
            expected = self._expected(problem.gates, group_of, cost)
            keep_params = (1 - problem.sparsity) * expected.total
            def project(values):
                return _clip(values - _shift(values, lambda lam: expected(_clip(values - lam, opts.eps)), keep_params),
                             opts.eps)

            if y is not None:
                y = self._gated_start(problem, y, cost, expected, keep_params)
        else:
            budgets = [(1 - problem.sparsity) * float(cost[p].sum()) for p in partitions]

            def project(values):
                out = values.clone()
                for part, keep_params in zip(partitions, budgets):
                    out[part] = project_to_budget(values[part], cost[part], keep_params, opts.eps)
                return out

        splits = sizes + [len(problem.gates)] if gated else sizes
        s = self._search(problem, problem.resume["s"] if problem.resume else project(y), project, splits)
        if gated:
            s, gate_s = s[:len(group_of)], s[len(group_of):]
            # by time, the channels cannot meet what the gates left over: more gates go until it fits
            self.kept_gates, live, channel_budget = expected.decode(gate_s, keep_params, s if latency else None)
            self.gate_probabilities = gate_s.float()
            partitions = [live]
            budgets = [channel_budget]
        else:
            live = torch.ones_like(group_of, dtype=torch.bool)
        keep = torch.zeros_like(s, dtype=torch.bool)
        for part, keep_params in zip(partitions, budgets):
            keep[part] = final_keep(s[part], cost[part], keep_params)
        mlp_groups = [g for g, kind in enumerate(problem.kinds) if kind == "mlp" and bool(live[group_of == g].all())]
        keep = round_widths(keep, s, group_of, mlp_groups, problem.channel_multiple)
        # every group keeps at least one unit: its most probable one, paid for by the least probable kept unit
        for g in range(len(sizes)):
            members = (group_of == g).nonzero().squeeze(1)
            if not keep[members].any() and bool(live[members].all()):
                keep[members[s[members].argmax()]] = True
                same_part = next(p for p in partitions if p[members[0]])
                others = (keep & same_part & (group_of != g)).nonzero().squeeze(1)
                if others.numel():
                    keep[others[s[others].argmin()]] = False
        self.probabilities = [p.float() for p in s.split(sizes)]
        return list(keep.split(sizes))

    def _gated_start(self, problem: GlobalProblem, y: torch.Tensor, cost: torch.Tensor, expected: "ExpectedParams",
                     keep_params: float) -> torch.Tensor:
        """Channel probabilities ``y`` and the gates' together, before the first projection. By parameters,
        the gates start where ``_initial_gates`` puts them and the channels alone take the first shift; by
        time (``cost="latency"``), the channels start as if they alone met the budget in their own count and
        the gates take the rest (the channels alone could not: blocks cost more than their parameters)."""
        eps = self.options.eps
        gates = _clip(self._initial_gates(problem.gates), eps)
        if self.options.cost == "latency":
            channels = project_to_budget(y, cost, (1 - problem.sparsity) * float(cost.sum()), eps)
            start = _shift(gates, lambda lam: expected(torch.cat([channels, _clip(gates - lam, eps)])), keep_params)
            return torch.cat([channels, _clip(gates - start, eps)])
        start = _shift(y, lambda lam: expected(torch.cat([_clip(y - lam, eps), gates])), keep_params)
        return torch.cat([y, gates + start])

    def _optimise_gates(self, problem: GlobalProblem, sizes, group_of, cost) -> list[torch.Tensor]:
        """``channels=False``: the search over the gates alone, every channel unit always kept (the
        masks handed to ``problem.evaluate`` keep them all); the removal goes gate by gate."""
        opts = self.options
        expected = self._expected(problem.gates, group_of, cost)
        keep_params = (1 - problem.sparsity) * expected.total
        channels = torch.ones(len(group_of), dtype=torch.float64)

        def project(gates):
            def spent(lam):
                return expected(torch.cat([channels, _clip(gates - lam, opts.eps)]))

            return _clip(gates - _shift(gates, spent, keep_params), opts.eps)

        def evaluate(masks, **kwargs):
            count = masks[-1].shape[0]
            return problem.evaluate([torch.ones(count, n) for n in sizes] + list(masks), **kwargs)

        start = problem.resume["s"] if problem.resume else project(_clip(self._initial_gates(problem.gates), opts.eps))
        s = self._search(replace(problem, evaluate=evaluate), start, project, [len(problem.gates)])
        self.kept_gates = expected.remove_whole(s, keep_params)
        self.gate_probabilities = s.float()
        self.probabilities = [torch.ones(n) for n in sizes]
        live = (expected.gate_of < 0) | self.kept_gates[expected.gate_of.clamp_min(0)]
        return list(live.split(sizes))

    def _search(self, problem: GlobalProblem, s: torch.Tensor, project, splits) -> torch.Tensor:
        """REINFORCE over Bernoulli keep masks from probabilities ``s``: leave-one-out or moving-average
        baseline, cosine learning rate, each step projected back onto the budget by ``project``."""
        opts = self.options
        generator = torch.Generator().manual_seed(problem.seed)
        baseline, first = None, 0
        if problem.resume:  # where an interrupted run saved its search
            generator.set_state(problem.resume["generator"])
            baseline, first = problem.resume["baseline"], int(problem.resume["step"])
            problem.history[:] = problem.resume["history"]

        def save(step):
            if problem.save is not None:
                problem.save({"s": s, "generator": generator.get_state(), "baseline": baseline, "step": step,
                              "history": list(problem.history)})

        if first == 0:
            save(0)  # the start, after the probes that measured it
        bar = tqdm(range(first, opts.steps), total=opts.steps, initial=first, desc="policy gradient",
                   disable=not problem.progress)
        for step in bar:
            masks = torch.bernoulli(s.expand(opts.samples, -1), generator=generator)
            losses = problem.evaluate([m.float() for m in masks.split(splits, dim=1)]).double()
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
            if (step + 1) % problem.save_every == 0 and step + 1 < opts.steps:
                save(step + 1)
        return s

    def _per_parameter(self) -> float:
        """What one parameter costs in the budget's count: 1, or (``cost="latency"``) its ms per token."""
        return self.options.latency_model["per_million"] / 1e6 if self.options.cost == "latency" else 1.0

    def _expected(self, gates, group_of: torch.Tensor, cost: torch.Tensor) -> "ExpectedParams":
        """The budget's count of channel units of ``cost`` and gates: a gate costs its parameters and, by
        time, also the fixed time of its kind of block."""
        fixed = self.options.latency_model if self.options.cost == "latency" else {}
        own = [gate.params * self._per_parameter() + fixed.get(gate.kind, 0.0) for gate in gates]
        return ExpectedParams(gates, group_of, cost, own=own)

    def _initial_gates(self, gates) -> torch.Tensor:
        """``sigmoid(logit(block_start) + init_temperature * (log score - median log score))``; every
        gate at ``block_start`` for a uniform start."""
        start = math.log(self.options.block_start / (1 - self.options.block_start))
        if self.options.init == "uniform":
            return torch.full((len(gates),), self.options.block_start, dtype=torch.float64)
        log_scores = torch.log(torch.tensor([g.score for g in gates], dtype=torch.float64).clamp_min(1e-12))
        return torch.sigmoid(start + self.options.init_temperature * (log_scores - log_scores.median()))


def _clip(values: torch.Tensor, eps: float) -> torch.Tensor:
    return values.clamp(eps, 1 - eps)


def _shift(values: torch.Tensor, spent, keep: float) -> float:
    """The shift at which ``spent(shift)`` meets ``keep``, searched within ``values``' range widened by one."""
    return bisect_shift(spent, keep, float(values.min()) - 1.0, float(values.max()) + 1.0)


class ExpectedParams:
    """The parameters a sample keeps, in expectation over channel probabilities and gate
    probabilities (the last ``len(gates)`` entries): a channel unit counts only while the gate over
    it (if any) is on, a gate's own parameters while it is on. Any other additive count works the same
    way: ``cost`` per channel unit and ``own`` per gate (default: the gates' parameters)."""

    def __init__(self, gates, group_of: torch.Tensor, cost: torch.Tensor, own: list[float] | None = None):
        self.units, self.cost = len(group_of), cost
        self.gate_of = torch.full((len(group_of),), -1, dtype=torch.long)
        for b, gate in enumerate(gates):
            for g in gate.groups:
                self.gate_of[group_of == g] = b
        own = [float(gate.params) for gate in gates] if own is None else own
        self.own = torch.tensor(own, dtype=torch.float64)
        under = self.gate_of >= 0
        # everything a gate removes: its own parameters and every channel unit under it
        self.whole = self.own.clone().index_add_(0, self.gate_of[under], cost[under])
        self.total = float(cost.sum() + self.own.sum())

    def __call__(self, s: torch.Tensor) -> float:
        units, gates = s[:self.units], s[self.units:]
        factor = torch.where(self.gate_of >= 0, gates[self.gate_of.clamp_min(0)], torch.ones_like(units))
        return float((self.cost * units * factor).sum() + (self.own * gates).sum())

    def decode(self, gates: torch.Tensor, keep_params: float, channels: torch.Tensor | None = None):
        """(kept gates, the channel units still live, the parameters left for them): the gates whose
        probability ended below one half go, least probable first, each while at least half of it fits
        in the removal the budget asks for. With ``channels`` (their probabilities), further gates go,
        least probable first, while the kept gates and the channels under them, at those probabilities,
        exceed ``keep_params``: each while at least half of it, so counted, fits in the excess, or
        whenever the live channels could not give up the excess even all together."""
        kept = self.remove_whole(gates, keep_params, below=0.5)
        if channels is not None:
            spent = self.cost * channels
            for b in torch.argsort(gates, stable=True).tolist():
                live = (self.gate_of < 0) | kept[self.gate_of.clamp_min(0)]
                excess = float(self.own[kept].sum() + spent[live].sum()) - keep_params
                if excess <= 0:
                    break
                whole = float(self.own[b] + spent[self.gate_of == b].sum())
                if kept[b] and (whole / 2 <= excess or excess >= float(spent[live].sum())):
                    kept[b] = False
        live = (self.gate_of < 0) | kept[self.gate_of.clamp_min(0)]
        return kept, live, keep_params - float(self.own[kept].sum())

    def remove_whole(self, gates: torch.Tensor, keep_params: float, below: float = 1.0) -> torch.Tensor:
        """The gates kept when those of probability under ``below`` go whole (own parameters and the
        channels under them), least probable first, each while at least half of it fits in the removal
        the budget asks for."""
        remove, removed = self.total - keep_params, 0.0
        kept = torch.ones_like(gates, dtype=torch.bool)
        for b in torch.argsort(gates, stable=True).tolist():
            if float(gates[b]) >= below:
                break
            if removed + float(self.whole[b]) / 2 <= remove:
                kept[b] = False
                removed += float(self.whole[b])
        return kept
