"""Sparsity profiles (OWL): the per-layer sparsities average to the request over the targeted
weights, respect the bounds, are deterministic and reproduced by a resumed prune; a layer with
planted activation outliers keeps more weights; the allocation arithmetic is the shared one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prune_interrupted, tiny_model

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.allocation import outlier_allocation, shift_into_budget
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
    ({"pattern": "2:4", "sparsity": None}, "keeps sparsity_profile='uniform'"),
    ({"method": "magnitude"}, "uses none: choose wanda"),
    ({"sparsity_profile": "flat"}, "sparsity_profile must be one of uniform, owl"),
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
