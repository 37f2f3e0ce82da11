"""ALPS on synthetic least-squares problems, and the shared PCG refit."""

import pytest
import torch
from test_methods import TARGETS, layer_error, run, synthetic_problem

from optimum_prune import get_method
from optimum_prune.methods.masks import budget
from optimum_prune.methods.alps import alps_solve
from optimum_prune.methods.linalg import masked_least_squares, prepare_hessian


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["50%", "70%", "2:4"])
def test_alps_beats_sparsegpt_and_wanda_on_every_trial(seed, name):
    W, X, stats = synthetic_problem(seed=seed)
    target = TARGETS[name]
    errors = {m: layer_error(W, run(m, W, stats, target).weight, X) for m in ("wanda", "sparsegpt", "alps")}
    assert errors["alps"] < errors["sparsegpt"] and errors["alps"] < errors["wanda"], errors


def test_alps_group_budgets_stay_per_matrix():
    W, _, stats = synthetic_problem(rows=40)
    parts = [W[:24], W[24:32], W[32:]]
    method = get_method("alps")(get_method("alps").parse_options({"scope": "matrix"}))
    for part, result in zip(parts, method.prune_linears(parts, stats, TARGETS["70%"])):
        assert int(result.mask.sum()) == budget(part.numel(), 0.7)


def test_alps_is_deterministic_and_support_settles():
    W, _, stats = synthetic_problem(seed=1)
    H, Wc = prepare_hessian(stats.gram, W, 0.01)
    options = get_method("alps").parse_options({})
    history = []
    a = alps_solve(Wc.clone(), H, TARGETS["70%"], options, history=history)
    b = alps_solve(Wc.clone(), H, TARGETS["70%"], options)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert history[-1]["support_changes"] == 0  # stopped on a stable support, not on max_iter
    assert history[-1]["iteration"] < options.max_iter
    assert history[0]["support_changes"] > 0  # ADMM did move the Wanda warm start
    assert all(later["rho"] > earlier["rho"] for earlier, later in zip(history, history[1:]))


def test_refit_is_the_exact_least_squares_on_the_support():
    W, _, stats = synthetic_problem(rows=6, cols=24)
    H, Wc = prepare_hessian(stats.gram, W, 0.01)
    H, Wc = H.double(), Wc.double()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    fitted = masked_least_squares(Wc, H, keep, iters=40)
    for r in range(W.shape[0]):
        S = keep[r].nonzero().squeeze(1)
        exact = torch.linalg.solve(H[S][:, S], (Wc[r] @ H)[S])
        torch.testing.assert_close(fitted[r, S], exact, rtol=1e-6, atol=1e-8)
        assert (fitted[r, ~keep[r]] == 0).all()


def test_refit_lowers_the_objective_of_any_mask():
    W, X, stats = synthetic_problem()
    H, Wc = prepare_hessian(stats.gram, W, 0.0)
    wanda = run("wanda", W, stats, TARGETS["50%"])
    refit = masked_least_squares(Wc, H, ~wanda.mask, iters=10)
    assert layer_error(W, refit, X) < 0.8 * layer_error(W, wanda.weight, X)


def test_float32_eigendecomposition_is_an_option_that_still_beats_sparsegpt():
    """``eigh_dtype="float32"`` solves the same problems (layer error within 1% of float64's, below
    SparseGPT's) and declares the smaller working set it was measured to hold."""
    from optimum_prune.errors import PruningError

    alps = get_method("alps")
    for seed in range(3):
        W, X, stats = synthetic_problem(seed=seed)
        target = TARGETS["70%"]
        errors = {dtype: layer_error(W, alps(alps.parse_options({"eigh_dtype": dtype}))
                                     .prune_linears([W], stats, target)[0].weight, X)
                  for dtype in ("float64", "float32")}
        assert abs(errors["float32"] / errors["float64"] - 1) < 0.01, errors
        assert errors["float32"] < layer_error(W, run("sparsegpt", W, stats, target).weight, X)
    low = alps(alps.parse_options({"eigh_dtype": "float32"}))
    assert low.workspace_bytes(4096, 14336) < alps().workspace_bytes(4096, 14336)
    assert low.solve_flops(4096, 14336) < alps().solve_flops(4096, 14336)
    with pytest.raises(PruningError, match="eigh_dtype"):
        alps.parse_options({"eigh_dtype": "float16"})
