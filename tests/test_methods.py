"""The baselines on synthetic layer problems: patterns met exactly, objectives ordered, SparseGPT
equal to the textbook optimal-brain-surgeon recursion."""

import pytest
import torch

from optimum_prune import PruningConfig, get_method
from optimum_prune.calibration.statistics import InputStatistics
from optimum_prune.configuration import SparsityPattern
from optimum_prune.methods.masks import budget
from optimum_prune.methods import Target, measured_sparsity, prune_mask, satisfies_nm
from optimum_prune.methods.linalg import inverse_cholesky_upper, prepare_hessian
from optimum_prune.methods.sparsegpt import sparsegpt_solve


def synthetic_problem(rows=48, cols=64, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.75 * torch.randn(cols, generator=g))  # uneven input feature scales, as in LLMs
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5  # correlated features
    X = (torch.randn(tokens, cols, generator=g) @ mix) * scales
    W = torch.randn(rows, cols, generator=g)
    stats = InputStatistics(cols, {"gram", "sq_norm"})
    stats.update(X)
    return W, X, stats


def layer_error(W, W_new, X):
    return float(((X @ (W - W_new).T) ** 2).sum())


def run(method, W, stats, target, **options):
    cls = get_method(method)
    return cls(cls.parse_options(options)).prune_linears([W], stats, target)[0]


TARGETS = {
    "50%": Target(0.5, SparsityPattern.parse("unstructured")),
    "70%": Target(0.7, SparsityPattern.parse("unstructured")),
    "2:4": Target(0.5, SparsityPattern.parse("2:4")),
}


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pattern_met_exactly(method, name):
    W, _, stats = synthetic_problem()
    target = TARGETS[name]
    result = run(method, W, stats, target)
    assert torch.equal(result.weight == 0, result.mask) or bool((result.weight[result.mask] == 0).all())
    rows, cols = W.shape
    per_row = method == "wanda" or target.is_nm  # wanda compares within rows; N:M is per row by nature
    expected = rows * budget(cols, target.sparsity) if per_row else budget(W.numel(), target.sparsity)
    assert int(result.mask.sum()) == expected
    assert measured_sparsity(result.weight) == pytest.approx(expected / W.numel())
    if target.is_nm:
        assert satisfies_nm(result.weight, 2, 4)
    if method == "wanda" and not target.is_nm:  # per-row comparison group
        assert (result.mask.sum(1) == budget(W.shape[1], target.sparsity)).all()


@pytest.mark.parametrize("name", list(TARGETS))
def test_layer_objective_sparsegpt_below_wanda_below_magnitude(name):
    W, X, stats = synthetic_problem()
    target = TARGETS[name]
    errors = {m: layer_error(W, run(m, W, stats, target).weight, X) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_wanda_score_is_weight_times_input_norm():
    W, X, stats = synthetic_problem(rows=4, cols=8)
    result = run("wanda", W, stats, TARGETS["50%"])
    scores = W.abs() * X.norm(dim=0)
    expected = scores <= scores.kthvalue(4, dim=1, keepdim=True).values
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight[~result.mask], W[~result.mask])  # Wanda never updates kept weights


def reference_obs_nm(W, H, n, m):
    """Textbook OBS, column by column, with explicit inverses of the remaining Hessian (float64)."""
    W = W.double().clone()
    H = H.double()
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            sal = torch.stack([W[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, j + m)], 1)
            mask[:, j : j + m] = prune_mask(sal, Target(1 - n / m, SparsityPattern.parse(f"{n}:{m}")))
        Hinv = torch.linalg.inv(H[j:, j:])
        removed = W[:, j] * mask[:, j]
        W[:, j:] -= torch.outer(removed / Hinv[0, 0], Hinv[0])
    W[mask] = 0
    return W, mask


@pytest.mark.parametrize("blocksize", [4, 16, 128])
def test_sparsegpt_matches_textbook_obs(blocksize):
    W, _, stats = synthetic_problem(rows=12, cols=32)
    H, Wc = prepare_hessian(stats.gram, W, 0.01)
    ref_W, ref_mask = reference_obs_nm(Wc, H, 2, 4)
    out_W, out_mask = sparsegpt_solve(Wc.clone(), inverse_cholesky_upper(H), TARGETS["2:4"], blocksize)
    assert torch.equal(out_mask, ref_mask)
    torch.testing.assert_close(out_W.double(), ref_W, rtol=1e-3, atol=1e-3)


def test_sparsegpt_group_solve_equals_separate_solves():
    W, _, stats = synthetic_problem(rows=40, cols=64)
    parts = [W[:24], W[24:32], W[32:]]  # q, k, v sharing one input
    method = get_method("sparsegpt")(get_method("sparsegpt").parse_options({}))
    for target in TARGETS.values():
        together = method.prune_linears(parts, stats, target)
        for part, joint in zip(parts, together):
            alone = method.prune_linears([part], stats, target)[0]
            assert torch.equal(alone.mask, joint.mask)
            torch.testing.assert_close(alone.weight, joint.weight, rtol=1e-4, atol=1e-5)
            assert int(joint.mask.sum()) <= budget(part.numel(), target.sparsity)  # budget per matrix, not shared


def test_sparsegpt_dead_inputs_and_singular_gram_give_finite_weights():
    W, X, _ = synthetic_problem(rows=16, cols=32, tokens=8)  # 8 tokens: rank-deficient Gram
    X[:, 3] = 0  # a dead input feature
    stats = InputStatistics(32, {"gram"})
    stats.update(X)
    result = run("sparsegpt", W, stats, TARGETS["50%"])
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, 3] == 0).all()


def test_method_options_come_from_config():
    cfg = PruningConfig(method="sparsegpt", method_kwargs={"blocksize": 32})
    assert cfg.method_options.blocksize == 32


def test_masks_exact_with_ties():
    scores = torch.ones(3, 8)
    assert (prune_mask(scores, TARGETS["50%"]).sum(1) == 4).all()
    assert int(prune_mask(scores, TARGETS["70%"], scope="matrix").sum()) == budget(24, 0.7)
    assert satisfies_nm(torch.where(prune_mask(scores, TARGETS["2:4"]), 0.0, 1.0), 2, 4)


@pytest.mark.parametrize("name", ["50%", "2:4"])
def test_masks_of_wide_weights_are_made_in_row_slices_with_the_same_result(monkeypatch, name):
    from optimum_prune.methods import masks

    scores = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    scores[:, :9] = 0.0  # ties, as pruned weights give
    whole = prune_mask(scores, TARGETS[name])
    monkeypatch.setattr(masks, "MASK_CHUNK_ELEMENTS", 5 * 64)  # slices of 5 rows, the last one short
    sliced = prune_mask(scores, TARGETS[name])
    assert torch.equal(sliced, whole)
    assert (sliced.sum(1) == 32).all()


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("scope", ["row", "matrix"])
@pytest.mark.parametrize("method, options", [("alps", {}), ("fista", {"rounds": 2}), ("sparsefw", {"iterations": 30})])
def test_optimisation_methods_meet_the_pattern_exactly(method, options, name, scope):
    W, _, stats = synthetic_problem()
    target = TARGETS[name]
    result = run(method, W, stats, target, scope=scope, **options)
    rows, cols = W.shape
    per_row = scope == "row" or target.is_nm
    expected = rows * budget(cols, target.sparsity) if per_row else budget(W.numel(), target.sparsity)
    assert int(result.mask.sum()) == expected
    assert bool((result.weight[result.mask] == 0).all())
    if per_row:
        assert (result.mask.sum(1) == budget(cols, target.sparsity)).all()
    if target.is_nm:
        assert satisfies_nm(result.weight, 2, 4)
