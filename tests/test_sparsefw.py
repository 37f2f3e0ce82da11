"""SparseFW: exact patterns, a relaxed objective that decreases with a falling duality gap, rounded
masks below Wanda's, the optional refit, and the structured (channel-mask) variant."""

import pytest
import torch
from conftest import synthetic_structured_problem
from test_methods import TARGETS, layer_error, run, synthetic_problem

from optimum_prune import get_method
from optimum_prune.methods.linalg import prepare_hessian
from optimum_prune.methods.masks import budget
from optimum_prune.methods.sparsefw import SparseFWOptions, fixed_keep_mask, frank_wolfe_mask
from optimum_prune.methods.structured import keep_top
from optimum_prune.structure.groups import unit_indices


@pytest.mark.parametrize("name", list(TARGETS))
def test_without_refit_the_kept_weights_are_the_original_ones(name):
    W, _, stats = synthetic_problem()
    result = run("sparsefw", W, stats, TARGETS[name], iterations=30)
    assert torch.equal(result.weight[~result.mask], W[~result.mask])


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_relaxed_objective_decreases_and_gap_falls(name, scope):
    W, _, stats = synthetic_problem(seed=2)
    H, W = prepare_hessian(stats.gram, W, 0.01)
    target = TARGETS[name]
    scores = W.abs() * torch.diagonal(H).sqrt()
    history = []
    M = frank_wolfe_mask(W, H, target, scores, SparseFWOptions(iterations=120, tol=0.0, scope=scope), history=history)
    objective = [h["objective"] for h in history]
    gaps = [h["gap"] for h in history]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(objective, objective[1:])), "line search never increases f"
    assert objective[-1] < 0.9 * objective[0]
    assert min(gaps) >= -1e-3 * objective[0]  # the gap bounds f - f* from above: never (really) negative
    assert sum(gaps[-10:]) / 10 < 0.2 * gaps[0]
    stopped = []
    frank_wolfe_mask(W, H, target, scores, SparseFWOptions(iterations=120, tol=0.05, scope=scope), history=stopped)
    assert len(stopped) < 120 and stopped[-1]["gap"] <= 0.05 * stopped[-1]["objective"] + 1e-6
    # the relaxed mask stays feasible: in [0, 1], the budget kept, fixed entries at 1
    assert float(M.min()) >= -1e-5 and float(M.max()) <= 1 + 1e-5
    kept = W.shape[1] - budget(W.shape[1], target.sparsity)
    if scope == "row" or target.is_nm:
        torch.testing.assert_close(M.sum(1), torch.full((W.shape[0],), float(kept)), rtol=0, atol=1e-3)
    fixed = fixed_keep_mask(scores, target, 0.9, None, scope)
    assert bool((M[fixed] > 1 - 1e-5).all())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(TARGETS))
def test_rounded_mask_beats_wanda(seed, name):
    W, X, stats = synthetic_problem(seed=seed)
    target = TARGETS[name]
    wanda = layer_error(W, run("wanda", W, stats, target).weight, X)
    fw = layer_error(W, run("sparsefw", W, stats, target).weight, X)
    assert fw < 0.95 * wanda, (fw, wanda)
    refit = layer_error(W, run("sparsefw", W, stats, target, refit=True).weight, X)
    assert refit < fw


def test_standard_step_also_descends():
    W, X, stats = synthetic_problem(seed=1)
    target = TARGETS["70%"]
    wanda = layer_error(W, run("wanda", W, stats, target).weight, X)
    fw = layer_error(W, run("sparsefw", W, stats, target, step="standard").weight, X)
    assert fw < wanda


def test_structured_variant_beats_the_single_unit_ranking():
    """Channel masks by FW: the consumer's error of dropping the chosen units is below that of
    dropping the units that are individually least costly, and refit restores on the kept ones."""
    problem, Z = synthetic_structured_problem(seed=3, cols_per_unit=2)
    remove = 20
    method = get_method("sparsefw")(SparseFWOptions(iterations=100))
    result = method.prune_structured(problem, remove)
    assert result.keep.numel() == problem.units - remove and result.consumer_weight is None

    def error(keep):
        cols = unit_indices(keep, problem.cols_per_unit)
        return float(((Z @ problem.consumer.T - Z[:, cols] @ problem.consumer[:, cols].T) ** 2).sum())

    W, gram = problem.consumer, problem.consumer_stats.gram
    single = ((W.T @ W) * gram).diagonal().reshape(-1, 2).sum(1)
    assert error(result.keep) < error(keep_top(single, remove))
    restored = get_method("sparsefw")(SparseFWOptions(refit=True)).prune_structured(problem, remove)
    assert restored.consumer_weight.shape == (problem.consumer.shape[0], (problem.units - remove) * 2)
