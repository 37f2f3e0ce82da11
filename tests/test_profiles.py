"""Sparsity profiles (OWL, measured sensitivity): the per-layer sparsities average to the request
over the targeted weights, respect the bounds, are deterministic and reproduced by a resumed prune;
a layer with planted activation outliers keeps more weights; a planted insensitive layer takes more
sparsity than the others; the allocation arithmetic is the shared one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import prune_interrupted, tiny_model

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.allocation import outlier_allocation, shift_into_budget
from optimum_prune.calibration.profiles import LayerReplay, sensitivity_allocation, sensitivity_levels
from optimum_prune.structure import find_decoder_layers


def calibration():
    return torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))


def config(**kw):
    base = dict(method="wanda", sparsity=0.6, sparsity_profile="owl", num_calibration_samples=8, seqlen=32)
    base.update(kw)
    return PruningConfig(**base)


def zeros_per_layer(model):
    _, layers = find_decoder_layers(model)
    out = []
    for layer in layers:
        weights = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        out.append((sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)))
    return out


def planted_model():
    """Layer 2's inputs carry outliers: a few channels of its norms scaled up 40x."""
    model = tiny_model("llama", num_hidden_layers=4)
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        for norm in (layers[2].input_layernorm, layers[2].post_attention_layernorm):
            norm.weight[:3] *= 40
    return model


def test_the_average_is_the_request_and_the_outlier_layer_keeps_more():
    model = planted_model()
    pruner = Pruner(config())
    pruner.prune(model, calibration(), progress=False)
    chosen = pruner.report.layer_sparsity
    assert len(chosen) == 4 and chosen[2] == min(chosen) and max(chosen) - min(chosen) > 0.05
    zeros = zeros_per_layer(model)
    assert sum(z for z, _ in zeros) / sum(n for _, n in zeros) == pytest.approx(0.6, abs=0.005)
    for (z, n), target in zip(zeros, chosen):
        assert z / n == pytest.approx(target, abs=0.01)  # every layer reaches its own target
    again = Pruner(config())
    again.prune(planted_model(), calibration(), progress=False)
    assert again.report.layer_sparsity == chosen  # deterministic


def test_bounds_and_overrides_are_respected():
    pruner = Pruner(config(owl_lambda=0.3, layer_sparsity_min=0.55, layer_sparsity_max=0.65))
    pruner.prune(planted_model(), calibration(), progress=False)
    assert all(0.55 - 1e-9 <= s <= 0.65 + 1e-9 for s in pruner.report.layer_sparsity)
    model = planted_model()
    pinned = Pruner(config(overrides={"*.layers.0.*": {"sparsity": 0.2}}))
    pinned.prune(model, calibration(), progress=False)
    zeros = zeros_per_layer(model)
    assert zeros[0][0] / zeros[0][1] == pytest.approx(0.2, abs=0.01)
    free = zeros[1:]  # the other layers share the budget: their average is the request
    assert sum(z for z, _ in free) / sum(n for _, n in free) == pytest.approx(0.6, abs=0.005)


def pattern_stream(n: int = 3000) -> torch.Tensor:
    """Token ids following one fixed rule (next = 7 x this + 3 mod 256): a tiny model learns it in
    seconds, so pruning raises the loss (on a random model pruning often lowers it)."""
    ids = [0]
    for _ in range(n - 1):
        ids.append((ids[-1] * 7 + 3) % 256)
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def trained_state():
    model = tiny_model("llama", num_hidden_layers=4).train()
    data = pattern_stream().view(-1, 30)[:96]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(input_ids=data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.2
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def insensitive_model(state):
    """The trained model with layer 1 writing almost nothing into the residual stream (its output
    projections scaled down 1000x): pruning it barely moves the loss."""
    model = tiny_model("llama", num_hidden_layers=4)
    model.load_state_dict(state)
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        layers[1].self_attn.o_proj.weight.mul_(1e-3)
        layers[1].mlp.down_proj.weight.mul_(1e-3)
    return model.eval()


def test_sensitivity_gives_the_insensitive_layer_more_and_meets_the_average(trained_state):
    model = insensitive_model(trained_state)
    pruner = Pruner(config(sparsity_profile="sensitivity"))
    pruner.prune(model, pattern_stream(), progress=False)
    chosen = pruner.report.layer_sparsity
    assert len(chosen) == 4 and chosen[1] == max(chosen) == pytest.approx(0.7)  # the highest level measured
    assert min(chosen) < 0.6
    zeros = zeros_per_layer(model)
    assert sum(z for z, _ in zeros) / sum(n for _, n in zeros) == pytest.approx(0.6, abs=0.005)
    for (z, n), target in zip(zeros, chosen):
        assert z / n == pytest.approx(target, abs=0.01)
    again = Pruner(config(sparsity_profile="sensitivity"))
    again.prune(insensitive_model(trained_state), pattern_stream(), progress=False)
    assert again.report.layer_sparsity == chosen  # deterministic
    bounded = Pruner(config(sparsity_profile="sensitivity", layer_sparsity_min=0.55, layer_sparsity_max=0.65))
    bounded.prune(insensitive_model(trained_state), pattern_stream(), progress=False)
    assert all(0.55 - 1e-9 <= s <= 0.65 + 1e-9 for s in bounded.report.layer_sparsity)
    assert bounded.report.layer_sparsity[1] == pytest.approx(0.65)


def test_replayed_layers_leave_the_loss_unchanged():
    """The sensitivity pass skips the layers before the measured one by replaying their dense
    outputs: with nothing pruned, every starting point gives the dense loss."""
    model = tiny_model("llama", num_hidden_layers=4).eval()
    _, layers = find_decoder_layers(model)
    batches = list(calibration()[:256].view(8, 32).split(4))
    replay = LayerReplay(list(layers))
    with torch.no_grad():
        dense = replay.record(model, batches)
        for stop in range(5):
            assert replay.losses(model, batches, stop) == pytest.approx(dense, rel=1e-6)
    assert all("forward" not in layer.__dict__ for layer in layers)  # the layers' own forward is back


def test_sensitivity_allocation_spends_the_budget_cheapest_first():
    levels = sensitivity_levels(0.5, 0.0, 0.99)
    assert levels == pytest.approx([0.3, 0.4, 0.5, 0.6])
    cheap, dear = torch.tensor([0.0, 0.01, 0.02, 0.03]), torch.tensor([0.1, 0.3, 0.9, 2.0])
    weights = torch.tensor([1.0, 1.0, 2.0])
    values = sensitivity_allocation([cheap, dear, dear], levels, weights, 0.5, 0.0)
    assert sum(v * w for v, w in zip(values, weights.tolist())) / 4 == pytest.approx(0.5)
    # the cheap layer to its last level; of the two equally fragile ones the larger removes more
    # weights for the same loss, so it goes further
    assert values == pytest.approx([0.6, 0.4, 0.5])
    low = sensitivity_levels(0.5, 0.35, 0.55)
    assert low == pytest.approx([0.35, 0.4, 0.5, 0.55])
    curves = [torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([0.1, 0.5, 1.0, 1.5])]
    bounded = sensitivity_allocation(curves, low, torch.ones(2), 0.5, 0.35)
    assert bounded[0] == pytest.approx(0.55) and bounded[1] == pytest.approx(0.45)


def test_shared_allocation_arithmetic():
    ratios, weights = torch.tensor([0.01, 0.05, 0.02]), torch.tensor([1.0, 1.0, 2.0])
    s = outlier_allocation(ratios, weights, 0.7, 0.1)
    assert float((s * weights).sum() / weights.sum()) == pytest.approx(0.7, abs=1e-9)
    assert int(s.argmin()) == 1 and int(s.argmax()) == 0 and float(s.max() - s.min()) == pytest.approx(0.2)
    clipped = shift_into_budget(torch.tensor([0.1, 0.5, 0.9]), torch.ones(3), 1.5, 0.2, 0.6)
    assert float(clipped.sum()) == pytest.approx(1.5) and float(clipped.max()) <= 0.6 + 1e-6


def test_resume_reproduces_the_profile(tmp_path):
    reference = planted_model()
    full = Pruner(config())
    full.prune(reference, calibration(), progress=False)
    prune_interrupted(config(), planted_model(), calibration(), 2, checkpoint_dir=tmp_path / "ckpt")
    resumed_model = planted_model()
    resumed = Pruner(config())
    resumed.prune(resumed_model, calibration(), progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.report.layer_sparsity == full.report.layer_sparsity
    for (name, a), b in zip(reference.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kwargs, fragment", [
    ({"pattern": "2:4", "sparsity": None}, "use sparsity_profile='sensitivity' and the patterns"),
    ({"method": "magnitude"}, "uses none: choose wanda"),
    ({"sparsity_profile": "flat"}, "sparsity_profile must be one of uniform, owl, sensitivity"),
    ({"sparsity_profile": "sensitivity", "sensitivity_samples": 0}, "sensitivity_samples must be a whole number"),
    ({"layer_sparsity_max": 0.5}, "layer_sparsity_min <= sparsity <= layer_sparsity_max"),
    ({"owl_lambda": 0.6}, "owl_lambda must be in"),
])
def test_refusals_name_the_fix(kwargs, fragment):
    with pytest.raises(PruningError, match=fragment):
        config(**kwargs)


def test_cli_writes_the_profile(tmp_path, capsys):
    from conftest import make_texts, make_tokenizer

    from optimum_prune.commands.prune import main

    planted_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(40)))
    code = main(["--model", str(tmp_path / "model"), "--method", "sparsegpt", "--sparsity", "0.7",
                 "--sparsity-profile", "owl", "--owl-lambda", "0.1", "--dataset", str(tmp_path / "calib.txt"),
                 "--num-samples", "8", "--seqlen", "32", "--no-progress", "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    per_layer = results["layer_sparsity"]["per_layer"]
    assert results["layer_sparsity"]["profile"] == "owl" and len(per_layer) == 4
    assert sum(per_layer) / 4 == pytest.approx(0.7, abs=1e-3)
    assert "`owl` profile, layer by layer" in (tmp_path / "out" / "README.md").read_text()
    assert PruningConfig.from_pretrained(tmp_path / "out").owl_lambda == 0.1


def test_mixed_patterns_keep_the_fragile_layers_dense_and_meet_the_average(trained_state):
    """2:4 everywhere or dense, at a mean sparsity of 3/8: the layers whose 2:4 costs least take it."""
    from optimum_prune.methods import satisfies_nm

    model = insensitive_model(trained_state)
    cfg = config(pattern="2:4", sparsity=0.375, sparsity_profile="sensitivity", layer_patterns=["dense"])
    pruner = Pruner(cfg)
    pruner.prune(model, pattern_stream(), progress=False)
    patterns = pruner.report.layer_patterns
    assert sorted(patterns) == ["2:4", "2:4", "2:4", "dense"] and patterns[1] == "2:4"  # the quiet layer is pruned
    _, layers = find_decoder_layers(model)
    for layer, chosen in zip(layers, patterns):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                if chosen == "dense":
                    assert int((module.weight == 0).sum()) == 0
                else:
                    assert satisfies_nm(module.weight, 2, 4)
    assert pruner.report.overall_sparsity == pytest.approx(0.375, abs=1e-6)
    assert pruner.report.layer_sparsity == [0.0 if p == "dense" else 0.5 for p in patterns]
    again = Pruner(cfg)
    again.prune(insensitive_model(trained_state), pattern_stream(), progress=False)
    assert again.report.layer_patterns == patterns  # deterministic


def test_choose_options_meets_the_budget_at_the_least_damage():
    from optimum_prune.allocation import choose_options

    damage = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.0, 0.1], [3.0, 0.0, 2.0]])  # options: 2:4, dense, 4:8
    sparsity = torch.tensor([0.5, 0.0, 0.5])
    assert choose_options(damage, sparsity, torch.ones(3), 0.5) == [2, 2, 2]  # 4:8 is cheaper at the same sparsity
    assert choose_options(damage, sparsity, torch.ones(3), 1 / 3) == [2, 2, 1]  # the dearest layer stays dense
    assert choose_options(damage, sparsity, torch.ones(3), 0.0) == [1, 1, 1]
    with pytest.raises(ValueError):
        choose_options(damage, sparsity, torch.ones(3), 0.6)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"pattern": "2:4", "sparsity": None, "layer_patterns": ["4:8"], "sparsity_profile": "owl"}, "layer_patterns choose"),
    ({"pattern": "2:4", "sparsity": 0.6, "layer_patterns": ["dense"]}, "between 0 and 0.5"),
    ({"pattern": "2:4", "sparsity": None, "layer_patterns": ["unstructured"]}, "N:M patterns or 'dense'"),
    ({"pattern": "2:4", "sparsity": None}, "layer_patterns=['4:8', 'dense']"),
])
def test_mixed_pattern_refusals_name_the_fix(kwargs, fragment):
    base = {"sparsity_profile": "sensitivity", **kwargs}
    with pytest.raises(PruningError, match=re.escape(fragment)):
        config(**base)


def test_cli_writes_the_mixed_patterns(tmp_path, capsys, trained_state):
    from conftest import make_texts, make_tokenizer

    from optimum_prune.commands.prune import main

    insensitive_model(trained_state).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(40)))
    code = main(["--model", str(tmp_path / "model"), "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.375",
                 "--sparsity-profile", "sensitivity", "--layer-patterns", "dense", "4:8",
                 "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "8", "--seqlen", "32", "--no-progress",
                 "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    profile = json.loads((tmp_path / "out" / "pruning_results.json").read_text())["layer_sparsity"]
    assert len(profile["patterns"]) == 4 and set(profile["patterns"]) <= {"2:4", "4:8", "dense"}
    assert sum(profile["per_layer"]) / 4 >= 0.375 - 1e-9
    assert "N:M pattern layer by layer" in (tmp_path / "out" / "README.md").read_text()
    assert PruningConfig.from_pretrained(tmp_path / "out").layer_patterns == ["dense", "4:8"]
