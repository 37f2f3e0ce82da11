"""Policy-gradient global structured pruning: exact budget, learning a planted redundancy, no weight
gradients, heterogeneous widths that save and load."""

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.allocation import allocate
from optimum_prune.methods.policy_gradient import final_keep, project_to_budget, round_widths


def config(**kw):
    options = kw.pop("method_kwargs", {})
    base = dict(method="policy_gradient", pattern="structured", num_calibration_samples=8, seqlen=32, batch_size=4,
                channel_multiple=1,
                method_kwargs={"steps": 20, **options})
    base.update(kw)
    return PruningConfig(**base)


def test_projection_meets_the_budget_inside_the_box():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(200, generator=g, dtype=torch.float64) * 1.6 - 0.3
    cost = torch.cat([torch.full((150,), 3.0), torch.full((50,), 40.0)]).double()
    budget = 0.6 * float(cost.sum())
    s = project_to_budget(y, cost, budget, 0.01)
    assert float((cost * s).sum()) == pytest.approx(budget, rel=1e-6)
    assert float(s.min()) >= 0.01 and float(s.max()) <= 0.99
    keep = final_keep(s, cost, budget)
    assert float(cost[keep].sum()) <= budget and float(cost[keep].sum()) > budget - 40


@pytest.mark.parametrize("budget", ["separate", "global"])
def test_budget_met_and_widths_heterogeneous(budget, calib_ids, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    pruner = Pruner(config(sparsity=0.3, method_kwargs={"budget": budget}))
    pruner.prune(model, calib_ids, progress=False)
    mlp_units = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    if budget == "separate":
        assert sum(mlp_units) == int(0.7 * 3 * 128 + 1e-6)  # the units of highest probability that fit
        assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.02)
    else:
        assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.03)
    assert all(p.grad is None for p in model.parameters())
    history = pruner.engine.history
    assert len(history) == 20 and all(h["loss"] > 0 for h in history)
    if len(set(mlp_units)) > 1:
        assert type(model).__name__ == "PrunedLlamaForCausalLM"
    folder = tmp_path / "pg"
    pruner.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = calib_ids[:16].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_learns_to_drop_planted_dead_channels():
    """Half of the MLP channels are dead (zero down_proj columns); the others carry the model's
    predictions (calibration text = its own greedy continuations). From a uniform initialisation,
    forward passes alone teach the policy which half to drop."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=1, intermediate_size=32)
    mlp = model.model.layers[0].mlp
    dead = torch.arange(0, 32, 2)
    with torch.no_grad():
        mlp.down_proj.weight[:, dead] = 0
        mlp.down_proj.weight.mul_(8)  # the MLP dominates the residual stream
        model.lm_head.weight.mul_(10)  # confident predictions: removing a live channel costs loss
    starts = torch.randint(0, 256, (16, 4), generator=torch.Generator().manual_seed(1))
    windows = model.generate(starts, max_new_tokens=28, min_new_tokens=28, do_sample=False, pad_token_id=0)
    cfg = config(sparsity=1 / 6, ignore=["*.self_attn"], num_calibration_samples=16,
                 method_kwargs={"steps": 100, "samples": 4, "lr": 0.5, "init": "uniform", "restore": False})
    pruner = Pruner(cfg)
    pruner.prune(model, windows, progress=False)
    probabilities = pruner.method.probabilities[0]
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    assert float(probabilities[alive].mean()) > float(probabilities[~alive].mean()) + 0.3
    assert mlp.down_proj.in_features == 32 - 16  # 1/6 of the layer's parameters = half of the MLP channels
    dead_kept = int((mlp.down_proj.weight.abs().sum(0) == 0).sum())
    assert dead_kept <= 4, f"{dead_kept} of the 16 dead channels kept (chance: 8)"
    assert all(p.grad is None for p in model.parameters())


def test_overrides_are_refused():
    with pytest.raises(PruningError, match="allocates widths globally"):
        Pruner(config(overrides={"*.layers.0": {"sparsity": 0.1}})).prune(tiny_model(), torch.zeros(200, dtype=torch.long),
                                                                          progress=False)


def _widths(model):
    return [(layer.mlp.down_proj.in_features, layer.self_attn.o_proj.in_features) for layer in model.model.layers]


def test_local_method_keeps_the_learned_widths(calib_ids):
    """``local_method`` lets a layer-wise method pick the units, at the widths the policy learned."""
    models = {}
    for local in (None, "fasp"):
        model = tiny_model("llama", num_hidden_layers=3)
        Pruner(config(sparsity=0.3, method_kwargs={"budget": "global", "local_method": local})).prune(
            model, calib_ids, progress=False)
        models[local] = model
    assert _widths(models[None]) == _widths(models["fasp"])
    kept_by_policy = [layer.mlp.down_proj.weight for layer in models[None].model.layers]
    kept_by_fasp = [layer.mlp.down_proj.weight for layer in models["fasp"].model.layers]
    assert any(not torch.equal(a, b) for a, b in zip(kept_by_policy, kept_by_fasp))


def test_sequential_restoration_fits_the_pruned_inputs(calib_ids):
    """The default restores layer by layer on the already-pruned layers' outputs; the one-pass
    variant fits the dense model's inputs. Same units either way, different consumers."""
    results = {}
    for sequential in (True, False):
        model = tiny_model("llama", num_hidden_layers=3)
        Pruner(config(sparsity=0.3, method_kwargs={"sequential": sequential})).prune(model, calib_ids, progress=False)
        results[sequential] = model
    assert _widths(results[True]) == _widths(results[False])
    first = [m.model.layers[0].mlp.down_proj.weight for m in (results[True], results[False])]
    last = [m.model.layers[-1].mlp.down_proj.weight for m in (results[True], results[False])]
    torch.testing.assert_close(first[0], first[1])  # layer 0 sees the same (dense) inputs either way
    assert not torch.allclose(last[0], last[1])  # later layers see the pruned layers' outputs


@pytest.mark.parametrize("sequential", [True, False])
def test_a_refit_beyond_max_restore_growth_keeps_the_kept_columns(sequential, calib_ids):
    """Consumers whose least-squares re-fit would outgrow the dense consumer keep the dense columns of
    the kept units: with a limit nothing meets, the model is the unrestored one (same search, same
    units), in the layer-wise finish and in the one-pass restoration, and the report names every
    consumer that lost units with its declined re-fit's growth; the default limit still re-fits the
    ordinary consumers of a tiny model and declines only re-fits beyond it."""
    from optimum_prune.methods.policy_gradient import PolicyGradientOptions

    models, reports = {}, {}
    for name, options in {"none-fits": {"max_restore_growth": 1e-9}, "unrestored": {"restore": False},
                          "default": {}}.items():
        model = tiny_model("llama", num_hidden_layers=3)
        pruner = Pruner(config(sparsity=0.3, method_kwargs={"sequential": sequential, **options}))
        pruner.prune(model, calib_ids, progress=False)
        models[name], reports[name] = model, pruner.report
    shrunk = {group for group, share in reports["none-fits"].sparsity.items() if share > 0}
    assert shrunk and set(reports["none-fits"].declined_refits) == shrunk
    assert all(growth > 1e-9 for growth in reports["none-fits"].declined_refits.values())
    assert not reports["unrestored"].declined_refits
    limit = PolicyGradientOptions().max_restore_growth
    assert all(growth > limit for growth in reports["default"].declined_refits.values())
    assert _widths(models["none-fits"]) == _widths(models["unrestored"]) == _widths(models["default"])
    for a, b in zip(models["none-fits"].state_dict().values(), models["unrestored"].state_dict().values()):
        assert torch.equal(a, b)
    consumers = [(m.model.layers[0].mlp.down_proj.weight, m.model.layers[0].self_attn.o_proj.weight)
                 for m in (models["default"], models["unrestored"])]
    assert any(not torch.equal(a, b) for a, b in zip(*consumers))


def test_declined_refits_reach_the_results_the_summary_and_the_card(calib_ids):
    """The consumers that kept their columns survive the report's round trip (the checkpoint's) and are
    named in ``pruning_results.json``'s results, the line the run prints and the model card."""
    from optimum_prune.engine.report import PruneReport
    from optimum_prune.model_card import build_model_card
    from optimum_prune.workflow import report_results, summary_lines

    model = tiny_model("llama", num_hidden_layers=2)
    cfg = config(sparsity=0.3, method_kwargs={"max_restore_growth": 1e-9})
    pruner = Pruner(cfg)
    pruner.prune(model, calib_ids, progress=False)
    declined = pruner.report.declined_refits
    assert declined
    again = PruneReport()
    again.load_dict(pruner.report.to_dict())
    assert again.declined_refits == declined
    results = {**report_results(pruner.report, cfg, pruner.method), "prune_seconds": 1.0,
               "parameters_before": 2, "parameters_after": 1}
    assert results["declined_refits"] == declined
    line = summary_lines(pruner.report, cfg, pruner.method, results)[-1]
    card = str(build_model_card(model, cfg, results=results))
    for name, growth in declined.items():
        assert f"{name} ({growth:.2f}x)" in line and f"{name} ({growth:.2f}x)" in card


@pytest.mark.parametrize("value", [0, -1.0, "big", True])
def test_max_restore_growth_is_checked(value):
    with pytest.raises(PruningError, match="policy_gradient option max_restore_growth must be a positive number"):
        Pruner(config(method_kwargs={"max_restore_growth": value}))


@pytest.mark.parametrize("local, match", [("sparsegpt", "layer-wise structured"), ("nope", "Unknown pruning method")])
def test_bad_local_method_is_refused(local, match):
    with pytest.raises(PruningError, match=match):
        Pruner(config(method_kwargs={"local_method": local}))


def test_allocation_is_the_cheapest_under_the_budget():
    """Convex damage curves (measured points joined linearly) are allocated at least as well as any
    allocation on a fine grid that removes the same parameters."""
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([0.15, 0.3, 0.45, 0.6], dtype=torch.float64)
    params = torch.tensor([100.0, 300.0, 200.0], dtype=torch.float64)
    for _ in range(20):
        curves = [(r, torch.cumsum(torch.rand(4, generator=g, dtype=torch.float64).sort().values, 0) * torch.rand(1, generator=g).item())
                  for _ in range(3)]
        target = 0.3 * float(params.sum())
        shares = allocate(curves, params, target)
        assert sum(s * float(p) for s, p in zip(shares, params)) == pytest.approx(target)
        assert all(0 <= s <= 0.6 + 1e-12 for s in shares)

        def damage(allocation):  # linear interpolation of the raw points (the hull lies below it)
            return sum(float(torch.tensor(np.interp(a, [0, *r.tolist()], [0, *d.tolist()])))
                       for a, (r, d) in zip(allocation, curves))

        best = min(damage((a, b, (target - a * 100 - b * 300) / 200))
                   for a in np.linspace(0, 0.6, 61) for b in np.linspace(0, 0.6, 61)
                   if 0 <= (target - a * 100 - b * 300) / 200 <= 0.6)
        assert damage(shares) <= best + 1e-9


def test_sensitivity_levels_are_checked():
    for levels in ([], [0.5], [1, -1], "1"):
        with pytest.raises(PruningError, match="sensitivity_levels"):
            Pruner(config(method_kwargs={"init_scope": "sensitivity", "sensitivity_levels": levels}))


def planted_weak_mlp():
    """Three layers whose middle MLP is scaled to near nothing, and 16 windows the model wrote itself."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.05)
        model.model.layers[2].mlp.down_proj.weight.mul_(6)
        model.lm_head.weight.mul_(5)
    starts = torch.randint(0, 256, (16, 4), generator=torch.Generator().manual_seed(1))
    return model, model.generate(starts, max_new_tokens=28, min_new_tokens=28, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("levels", [[1.0], [0.5, 1.0, 2.0]])
def test_sensitivity_start_thins_the_layer_that_does_not_matter(levels):
    """``init_scope="sensitivity"`` measures with forward passes what losing its weakest units costs
    each group: an MLP scaled to near nothing starts (and, without steps, ends) far thinner than
    the MLP that carries the predictions, under the same global budget (one measured level and a
    quadratic model, or several levels joined linearly)."""
    model, windows = planted_weak_mlp()
    cfg = config(sparsity=0.3, ignore=["*.self_attn"], num_calibration_samples=16,
                 method_kwargs={"steps": 0, "budget": "global", "init_scope": "sensitivity", "windows_per_step": 4,
                                "sensitivity_levels": levels})
    pruner = Pruner(cfg)
    pruner.prune(model, windows, progress=False)
    damage = pruner.method.sensitivity
    assert float(damage[1]) < 0.1 * float(damage[0]) and float(damage[1]) < 0.1 * float(damage[2])
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[1] < 0.25 * widths[0] and widths[1] < 0.25 * widths[2]
    assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.01)


def test_widths_round_to_the_multiple_and_may_stay_whole():
    """Each MLP group keeps its most probable units, a multiple of ``channel_multiple`` nearest the
    allocated count; one the allocation leaves nearly whole keeps its whole width, not an odd one."""
    group_of = torch.repeat_interleave(torch.arange(3), torch.tensor([128, 128, 8]))
    s = torch.rand(264, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = torch.zeros(264, dtype=torch.bool)
    for g, kept in enumerate([70, 124, 5]):  # group 2: too few units to round
        members = (group_of == g).nonzero().squeeze(1)
        keep[members[torch.argsort(s[members], descending=True)[:kept]]] = True
    rounded = round_widths(keep, s, group_of, [0, 1, 2], 32)
    assert [int(rounded[group_of == g].sum()) for g in range(3)] == [64, 128, 5]
    first = (group_of == 0).nonzero().squeeze(1)
    assert set(first[rounded[first]].tolist()) == set(first[torch.argsort(s[first], descending=True)[:64]].tolist())


def test_layerwise_finish_takes_the_activation_place(calib_ids, tmp_path):
    models = []
    for where in ("device", "disk"):
        model = tiny_model("llama", num_hidden_layers=2)
        Pruner(config(sparsity=0.3, method_kwargs={"steps": 2})).prune(
            model, calib_ids, progress=False, activations=where, activation_folder=tmp_path if where == "disk" else None)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.iterdir())


def planted_dead_block(layers=3):
    """A model whose MLP block of layer 1 adds nothing (zero down_proj) while the other MLPs dominate the
    residual stream, and windows of its own greedy continuations."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=layers, intermediate_size=32)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(0 if index == 1 else 8)
        model.lm_head.weight.mul_(10)
    starts = torch.randint(0, 256, (16, 4), generator=torch.Generator().manual_seed(1))
    return model, model.generate(starts, max_new_tokens=28, min_new_tokens=28, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("blocks", ["mlp", "block"])
def test_learns_to_drop_a_planted_dead_block(blocks, tmp_path):
    """Channels and blocks in one search: the MLP block that adds nothing is gated off and removed
    (the budget is exactly its parameters), the other layers keep every channel, and the pruned
    model computes what the dense one did; saved and reloaded, identical logits."""
    model, windows = planted_dead_block()
    with torch.no_grad():
        dense = model(windows[:4]).logits
    mlp_params = sum(p.numel() for p in model.model.layers[1].mlp.parameters())
    decoder = sum(p.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear) for p in m.parameters())
    cfg = config(sparsity=mlp_params / decoder, ignore=["*.self_attn"], num_calibration_samples=16,
                 method_kwargs={"steps": 60, "samples": 4, "lr": 0.5, "blocks": blocks, "restore": False})
    pruner = Pruner(cfg)
    pruner.prune(model, windows, progress=False)
    assert pruner.report.removed_blocks == ["model.layers.1.mlp"] and pruner.report.removed_layers == []
    assert pruner.report.unit_scores["model.layers.1.mlp"] < 0.5 < pruner.report.unit_scores["model.layers.0.mlp"]
    assert [layer.mlp.__class__.__name__ for layer in model.model.layers] == ["LlamaMLP", "AbsentMLP", "LlamaMLP"]
    assert [layer.mlp.down_proj.in_features for i, layer in enumerate(model.model.layers) if i != 1] == [32, 32]
    removed = pruner.report.overall_sparsity * (pruner.report.coverage or 1)  # one-pass restoration: no coverage
    assert removed == pytest.approx(mlp_params / decoder, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(windows[:4]).logits, dense, rtol=1e-5, atol=1e-4)
    pruner.save_pretrained(tmp_path / "pg")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pg")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows[:4]).logits, model(windows[:4]).logits, rtol=0, atol=0)


def test_learns_to_drop_a_planted_dead_layer_and_finishes_layer_by_layer():
    """``blocks="layer"``: the layer that adds nothing (zero o_proj and down_proj) goes whole, the layers
    after it move up (the layer-wise finish restores them under their new names) and the checkpoint
    is a stock one with fewer layers."""
    model, windows = planted_dead_block()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        dense = model(windows[:4]).logits
    layer_params = sum(p.numel() for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear)
                       for p in m.parameters())
    decoder = sum(p.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear) for p in m.parameters())
    cfg = config(sparsity=layer_params / decoder, num_calibration_samples=16,
                 method_kwargs={"steps": 60, "samples": 4, "lr": 0.1, "blocks": "layer"})
    pruner = Pruner(cfg)
    pruner.prune(model, windows, progress=False)
    assert pruner.report.removed_layers == [1] and model.config.num_hidden_layers == 2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert pruner.report.overall_sparsity * pruner.report.coverage == pytest.approx(layer_params / decoder, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(windows[:4]).logits, dense, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("blocks", ["layer", "block"])
def test_gates_alone_find_the_dead_layer_from_a_uniform_start_and_keep_every_channel(blocks):
    """``channels=False``: depth only. Every gate starts at the same probability (no influence start),
    the search alone finds the layer that adds nothing; it goes whole (with ``blocks="block"`` as its
    two blocks), every other layer keeps all its channels and heads, the logits stay the dense ones."""
    model, windows = planted_dead_block()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        dense = model(windows[:4]).logits
    widths = [(layer.mlp.down_proj.in_features, layer.self_attn.o_proj.in_features) for layer in model.model.layers]
    layer_params = sum(p.numel() for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear)
                       for p in m.parameters())
    decoder = sum(p.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear) for p in m.parameters())
    cfg = config(sparsity=layer_params / decoder, num_calibration_samples=16,
                 method_kwargs={"steps": 60, "samples": 4, "lr": 0.1, "blocks": blocks, "channels": False,
                                "init": "uniform", "block_start": 0.8})
    pruner = Pruner(cfg)
    pruner.prune(model, windows, progress=False)
    assert pruner.report.removed_layers == [1] and pruner.report.removed_blocks == []
    scores = pruner.report.unit_scores
    dead = [name for name in scores if name.startswith("model.layers.1")]
    assert max(scores[name] for name in dead) < min(v for name, v in scores.items() if name not in dead)
    assert [(layer.mlp.down_proj.in_features, layer.self_attn.o_proj.in_features)
            for layer in model.model.layers] == [widths[0], widths[2]]
    assert pruner.report.overall_sparsity * pruner.report.coverage == pytest.approx(layer_params / decoder, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(windows[:4]).logits, dense, rtol=1e-4, atol=1e-3)


def test_gates_start_from_the_loss_increase_of_removing_each_unit_alone():
    """``block_score="loss"``: the gates start ordered by the loss increase that ``block-influence``'s
    ``score="loss"`` measures (removing each layer alone); with no search step the depth-only decode
    removes that baseline's layer, which the influence start (a different layer on this model) does not."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    baseline = Pruner(PruningConfig(method="block-influence", pattern="structured", sparsity=0.25, seqlen=32,
                                    num_calibration_samples=8, batch_size=4,
                                    method_kwargs={"keep_ends": False, "score": "loss"}))
    baseline.prune(tiny_model("llama", num_hidden_layers=4), ids, progress=False)
    removed, start = {}, {}
    for score in ("influence", "loss"):
        cfg = config(sparsity=0.25, method_kwargs={"steps": 0, "blocks": "layer", "channels": False,
                                                   "block_score": score})
        pruner = Pruner(cfg)
        pruner.prune(tiny_model("llama", num_hidden_layers=4), ids, progress=False)
        removed[score], start[score] = pruner.report.removed_layers, pruner.report.unit_scores
    increase = baseline.report.unit_scores
    assert len(baseline.report.removed_layers) == 1 and removed["loss"] == baseline.report.removed_layers
    assert removed["influence"] != removed["loss"]
    assert sorted(start["loss"], key=start["loss"].get) == sorted(increase, key=increase.get)
    with pytest.raises(PruningError, match="block_score must be one of"):
        config(sparsity=0.2, method_kwargs={"blocks": "layer", "block_score": "cosine"})


def test_block_gates_need_one_budget_and_a_sensible_start():
    with pytest.raises(PruningError, match="searches the gates alone"):
        config(sparsity=0.2, method_kwargs={"channels": False})
    with pytest.raises(PruningError, match="needs one global budget"):
        config(sparsity=0.2, method_kwargs={"blocks": "layer", "budget": "separate"})
    with pytest.raises(PruningError, match="block_start must be in"):
        config(sparsity=0.2, method_kwargs={"blocks": "layer", "block_start": 1.0})
    with pytest.raises(PruningError, match="blocks must be one of"):
        config(sparsity=0.2, method_kwargs={"blocks": "heads"})
    assert config(sparsity=0.2, method_kwargs={"blocks": "block"}).method_kwargs["blocks"] == "block"


def test_expected_parameters_count_a_channel_only_while_its_gate_is_on():
    from optimum_prune.methods.policy_gradient import ExpectedParams
    from optimum_prune.methods.structured import Gate

    group_of = torch.tensor([0, 0, 1, 1, 1])  # group 0 under gate 0, group 1 under no gate
    cost = torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    expected = ExpectedParams([Gate(groups=[0], params=10, score=0.1)], group_of, cost)
    assert expected.total == 2 * 2 + 3 * 3 + 10
    s = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    assert expected(s) == pytest.approx(0.5 * (2 + 1) + 6 + 0.5 * 10)
    kept, live, left = expected.decode(torch.tensor([0.2], dtype=torch.float64), keep_params=9.0)
    assert not kept[0] and live.tolist() == [False, False, True, True, True] and left == 9.0
    kept, _, left = expected.decode(torch.tensor([0.2], dtype=torch.float64), keep_params=20.0)  # 3 to remove
    assert kept[0] and left == 10.0  # the gate (14 parameters) is far more than the removal asks


def test_expected_cost_takes_the_gates_fixed_cost_and_decode_removes_gates_until_the_channels_fit():
    """With ``own`` (a per-block cost model) a gate costs its fixed time beside its parameters'. A decode
    given the channel probabilities removes gates beyond the ones under one half, least probable first,
    until the kept gates and their channels at those probabilities fit."""
    from optimum_prune.methods.policy_gradient import ExpectedParams
    from optimum_prune.methods.structured import Gate

    group_of = torch.tensor([0, 0, 1, 1])  # group 0 under gate 0, group 1 under gate 1
    cost = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    gates = [Gate(groups=[0], params=0, score=0.1, kind="attention"), Gate(groups=[1], params=0, score=0.1)]
    expected = ExpectedParams(gates, group_of, cost, own=[6.0, 8.0])
    assert expected.total == 4 + 14
    channels = torch.ones(4, dtype=torch.float64)
    probabilities = torch.tensor([0.9, 0.8], dtype=torch.float64)  # both gates above one half
    kept, _, left = expected.decode(probabilities, keep_params=11.0)  # without the channels: nothing goes
    assert kept.tolist() == [True, True] and left == 11.0 - 14
    kept, live, left = expected.decode(probabilities, keep_params=11.0, channels=channels)
    assert kept.tolist() == [True, False] and live.tolist() == [True, True, False, False] and left == 5.0
    kept, _, _ = expected.decode(probabilities, keep_params=17.0, channels=channels)  # 1 over: 10 would overshoot
    assert kept.tolist() == [True, True]
    # gate 1 goes (half of its 8.2 fits in 8.9 over); then 0.7 over, which gate 0's channels (0.2) cannot give up
    kept, _, _ = expected.decode(probabilities, keep_params=5.5, channels=torch.full((4,), 0.1, dtype=torch.float64))
    assert kept.tolist() == [False, False]


def test_a_latency_budget_removes_the_layers_whose_time_it_needs():
    """``cost="latency"``: with a cost model where a layer's fixed time is four times its parameters',
    half of the time can only go as two whole layers of three (the channels hold a fifth of it): the
    layer that adds nothing goes first, one more follows and the one left keeps every channel. Half of
    the parameters, by the same search, is that layer and channels of the other two."""
    model, windows = planted_dead_block()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    layer_params = sum(p.numel() for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear)
                       for p in m.parameters())
    common = {"steps": 60, "samples": 4, "lr": 0.1, "blocks": "layer", "restore": False}
    latency = {"cost": "latency", "latency_model": {"per_million": 1e6, "layer": 4 * layer_params}}
    pruner = Pruner(config(sparsity=0.5, num_calibration_samples=16, method_kwargs={**common, **latency}))
    pruner.prune(model, windows, progress=False)
    assert 1 in pruner.report.removed_layers and len(pruner.report.removed_layers) == 2
    assert model.config.num_hidden_layers == 1 and model.model.layers[0].mlp.down_proj.in_features == 32
    by_params = tiny_model("llama", num_hidden_layers=3, intermediate_size=32)
    by_params.load_state_dict(dense)
    pruner = Pruner(config(sparsity=0.5, num_calibration_samples=16, method_kwargs=common))
    pruner.prune(by_params, windows, progress=False)
    assert pruner.report.removed_layers == [1] and by_params.config.num_hidden_layers == 2
    assert sum(layer.mlp.down_proj.in_features for layer in by_params.model.layers) < 64


def test_the_latency_cost_is_checked():
    with pytest.raises(PruningError, match="cost='latency' needs blocks"):
        config(sparsity=0.2, method_kwargs={"cost": "latency"})
    with pytest.raises(PruningError, match="cost must be one of"):
        config(sparsity=0.2, method_kwargs={"cost": "time", "blocks": "layer"})
    for model in ({"layers": 1.0}, {"mlp": -1}, [1.0], {"per_million": 0}):
        with pytest.raises(PruningError, match="latency_model"):
            config(sparsity=0.2, method_kwargs={"cost": "latency", "blocks": "layer", "latency_model": model})
    pruner = Pruner(config(sparsity=0.2, method_kwargs={"cost": "latency", "blocks": "block", "latency_model": {"mlp": 2}}))
    assert pruner.method.options.latency_model == {"per_million": 0.098, "layer": 1.9, "attention": 1.1, "mlp": 2.0}


def test_the_search_checks_the_memory_of_its_layer_wise_finish_before_it_starts(monkeypatch, calib_ids):
    """The finish's own per-layer memory check runs before the search's first pass (the model still
    dense), with the finishing method (FASP's least squares, or ``local_method``); a search without a
    layer-wise finish does not run it."""
    from optimum_prune.engine.layerwise import LayerwiseEngine
    from optimum_prune.methods.policy_gradient import PolicyGradient

    calls, searched = [], []
    monkeypatch.setattr(LayerwiseEngine, "check_memory", lambda self, *args, **kwargs: calls.append(
        (self.method.name, len(searched), self.model.model.layers[0].mlp.down_proj.in_features)))
    search = PolicyGradient.optimise
    monkeypatch.setattr(PolicyGradient, "optimise", lambda self, problem: searched.append(1) or search(self, problem))
    for options, expected in (({}, [("fasp", 0, 128)]), ({"local_method": "spap"}, [("spap", 0, 128)]),
                              ({"restore": False}, [])):
        calls.clear(), searched.clear()
        model = tiny_model("llama", num_hidden_layers=2)
        assert model.model.layers[0].mlp.down_proj.in_features == 128
        Pruner(config(sparsity=0.3, method_kwargs=options)).prune(model, calib_ids, progress=False)
        assert calls == expected and searched == [1]
