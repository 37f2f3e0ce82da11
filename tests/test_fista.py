"""FISTAPruner: exact patterns, objective below its warm start, lambda bisection, and the engine's
intra-layer error correction (paired statistics, corrected target, dense/pruned input paths)."""

import pytest
import torch
from conftest import tiny_model
from test_engine import small_config
from test_methods import TARGETS, layer_error, run, synthetic_problem

from optimum_prune import Pruner
from optimum_prune.calibration.statistics import InputStatistics
from optimum_prune.methods.fista import FISTAOptions, fista_solve
from optimum_prune.methods.linalg import corrected_target, prepare_hessian
from optimum_prune.methods.masks import budget


def test_fista_keeps_each_stacked_matrix_budget():
    """Linears sharing an input are solved as one tall matrix; a per-matrix budget stays per matrix."""
    W, _, stats = synthetic_problem(rows=60)
    parts = [W[:40], W[40:]]
    method = __import__("optimum_prune").get_method("fista")(FISTAOptions(scope="matrix"))
    results = method.prune_linears(parts, stats, TARGETS["70%"])
    for part, result in zip(parts, results):
        assert int(result.mask.sum()) == budget(part.numel(), 0.7)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["50%", "70%", "2:4"])
@pytest.mark.parametrize("warm_start", ["sparsegpt", "wanda"])
def test_fista_beats_the_warm_start_it_started_from(seed, name, warm_start):
    W, X, stats = synthetic_problem(seed=seed)
    target = TARGETS[name]
    start = layer_error(W, run(warm_start, W, stats, target).weight, X)
    fista = layer_error(W, run("fista", W, stats, target, warm_start=warm_start).weight, X)
    assert fista < 0.97 * start, (fista, start)
    if warm_start == "wanda":  # even from Wanda's mask it ends below SparseGPT
        assert fista < layer_error(W, run("sparsegpt", W, stats, target).weight, X)


def test_lambda_bisection_brings_the_l1_solution_near_the_target():
    W, _, stats = synthetic_problem(seed=1)
    H, W = prepare_hessian(stats.gram, W, 0.01)
    history = []
    fista_solve(W, H, TARGETS["50%"], FISTAOptions(rounds=8), history=history)
    gaps = [abs(h["natural_sparsity"] - 0.5) for h in history]
    assert len(history) == 8
    assert gaps[-1] < 0.05 and gaps[-1] < gaps[0], gaps
    assert history[-1]["best_error"] <= history[0]["best_error"]


# ------------------------------------------------------------------ error correction
def test_corrected_target_is_the_projection_of_the_dense_output():
    """||W' X* - W X||^2 == ||(W' - W~) X*||^2 + const for every W': the corrected problem is the
    original one, so any Gram-matrix solver handles it."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 24, generator=g)
    X_star = X + 0.3 * torch.randn(2000, 24, generator=g)  # inputs after upstream pruning
    W = torch.randn(10, 24, generator=g)
    stats = InputStatistics(24, {"gram"})
    stats.update_pair(X, X_star)
    H, W_tilde = corrected_target(stats, W, dampening=0.0)
    assert stats.paired and torch.allclose(stats.gram, X_star.T @ X_star / 2000, atol=1e-4)

    def true(Wp):
        return float(((X_star @ Wp.T - X @ W.T) ** 2).sum()) / 2000

    def corrected(Wp):
        D = Wp - W_tilde
        return float(((D @ H) * D).sum())

    offsets = [true(Wp) - corrected(Wp) for Wp in (torch.randn(10, 24, generator=g) for _ in range(4))]
    assert max(offsets) - min(offsets) < 1e-3 * abs(offsets[0]) + 1e-3
    assert true(W_tilde) <= true(W) + 1e-4  # the least-squares fit on X* beats the dense weight there


def _layer_output_error(pruned_model, dense_model, ids):
    """||pruned layer 0 output - dense layer 0 output||^2 on the same inputs (the layer's own error)."""
    outputs = {}
    for key, model in (("pruned", pruned_model), ("dense", dense_model)):
        layer = model.model.layers[0]
        handle = layer.register_forward_hook(lambda m, a, out, key=key: outputs.setdefault(key, []).append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            for batch in ids.split(4):
                model(input_ids=batch, use_cache=False)
        handle.remove()
    return float(sum(((p - d) ** 2).sum() for p, d in zip(outputs["pruned"], outputs["dense"])))


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
def test_error_correction_lowers_the_layer_output_error(calib_ids, pattern):
    dense = tiny_model("llama", num_hidden_layers=1, intermediate_size=96)
    ids = calib_ids[: 16 * 32].reshape(16, 32)
    errors = {}
    for correction in (True, False):
        model = tiny_model("llama", num_hidden_layers=1, intermediate_size=96)
        config = small_config(
            method="fista", num_calibration_samples=16,
            **({"pattern": "2:4"} if pattern == "2:4" else {"sparsity": float(pattern)}),
            method_kwargs={"error_correction": correction},
        )
        Pruner(config).prune(model, ids, progress=False)
        errors[correction] = _layer_output_error(model, dense, ids)
    assert errors[True] < 0.9 * errors[False], errors


def test_error_correction_pairs_dense_and_pruned_inputs(calib_ids, monkeypatch):
    """The engine hands the first stage (q/k/v) unpaired statistics, every later stage paired ones
    whose cross term really uses the dense layer's inputs."""
    from optimum_prune.methods.fista import FISTAPruner

    seen = []
    original = FISTAPruner.prune_linears

    def spy(self, weights, stats, target):
        seen.append((tuple(w.shape for w in weights), stats.paired, None if not stats.paired else
                     float((stats.cross - stats.gram).abs().max())))
        return original(self, weights, stats, target)

    monkeypatch.setattr(FISTAPruner, "prune_linears", spy)
    model = tiny_model("llama", num_hidden_layers=1)
    Pruner(small_config(method="fista")).prune(model, calib_ids, progress=False)
    assert [paired for _, paired, _ in seen] == [False, True, True, True]  # qkv, o, gate+up, down
    assert [len(shapes) for shapes, _, _ in seen] == [3, 1, 2, 1]
    assert all(diff > 0 for _, paired, diff in seen if paired)


@pytest.mark.parametrize("sequential", [True, False])
def test_error_correction_with_offload_matches_in_memory(tmp_path, calib_ids, sequential):
    """Dense/pruned weight swaps also work when accelerate keeps the weights in an offload store."""
    from accelerate import dispatch_model

    config = small_config(method="fista", sparsity=0.5, sequential=sequential, method_kwargs={"rounds": 2})
    reference = tiny_model("llama", num_hidden_layers=2)
    Pruner(config).prune(reference, calib_ids, progress=False)
    model = tiny_model("llama", num_hidden_layers=2)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu")
    Pruner(config).prune(model, calib_ids, progress=False)
    with torch.no_grad():
        ids = calib_ids[:32].unsqueeze(0)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
