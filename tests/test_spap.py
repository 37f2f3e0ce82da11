"""SPAP: budget, monotone alternations, and a lower layer error than FASP on the same problems."""

import pytest
import torch
from conftest import synthetic_structured_problem, tiny_model

from optimum_prune import Pruner, PruningConfig
from optimum_prune.methods.spap import layer_error
from optimum_prune.methods.structured import unit_indices
from optimum_prune.registry import get_method


def make(name, dampening=0.01, **options):
    cls = get_method(name)
    return cls(cls.parse_options(options), dampening=dampening)


def error_of(problem, result):
    from optimum_prune.methods.linalg import prepare_hessian

    H, W = prepare_hessian(problem.consumer_stats.gram, problem.consumer, 0.01)
    cols = unit_indices(result.keep, problem.cols_per_unit)
    weight = result.consumer_weight if result.consumer_weight is not None else problem.consumer[:, cols]
    return layer_error(W, H, weight, cols)


@pytest.mark.parametrize("cols_per_unit", [1, 4])
@pytest.mark.parametrize("remove", [8, 24])
def test_budget_is_met_exactly(cols_per_unit, remove):
    problem, _ = synthetic_structured_problem(units=40, cols_per_unit=cols_per_unit)
    result = make("spap").prune_structured(problem, remove)
    assert result.keep.numel() == 40 - remove
    assert torch.equal(result.keep, torch.unique(result.keep))  # sorted, no repeats
    assert result.consumer_weight.shape == (problem.consumer.shape[0], (40 - remove) * cols_per_unit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reported_objective_never_increases_and_budget_ramps(seed):
    problem, _ = synthetic_structured_problem(seed)
    spap = make("spap", steps=8, polish=4)
    result = spap.prune_structured(problem, 20)
    history = spap.history
    assert history[0]["selection"] == "init" and len(history) == 1 + 8 + 4
    removed = [h["removed"] for h in history[1:]]
    assert removed == sorted(removed) and removed[-1] == 20  # the budget ramps up, then stays
    mus = [h["mu"] for h in history[1:]]
    assert all(b > a for a, b in zip(mus, mus[1:]))
    best = [h["best"] for h in history if "best" in h]
    assert len(best) >= 5 and all(b <= a for a, b in zip(best, best[1:]))
    assert error_of(problem, result) == pytest.approx(best[-1], rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_layer_error_below_fasp(seed):
    problem, _ = synthetic_structured_problem(seed, units=64, out=32)
    spap = make("spap")
    spap_result = spap.prune_structured(problem, 32)
    fasp_result = make("fasp").prune_structured(problem, 32)
    spap_error, fasp_error = error_of(problem, spap_result), error_of(problem, fasp_result)
    assert spap_error < fasp_error, (spap_error, fasp_error)  # strictly: an alternation beat the FASP selection


@pytest.mark.parametrize("init", ["fasp", "wanda-sp"])
def test_spap_prunes_a_tiny_model(init, calib_ids):
    model = tiny_model("llama", num_hidden_layers=2)
    config = PruningConfig(method="spap", pattern="structured", sparsity=0.3, num_calibration_samples=8, seqlen=32,
                           channel_multiple=1, method_kwargs={"init": init})
    pruner = Pruner(config)
    pruner.prune(model, calib_ids, progress=False)
    assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.02)
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:30].unsqueeze(0)).logits).all()
