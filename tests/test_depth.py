"""Depth pruning (`block-influence`, ShortGPT): whole decoder layers removed, the least influential
first. Influence is ``1 - mean cos(layer input, layer output)`` measured on the dense model; a
removed layer behaves as if it passed its input through (identical logits) for every family of
tests/families.py; the result is a stock checkpoint with fewer layers that loads anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import python_stdout, tiny_model
from families import FAMILIES, build

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.structure.layers import find_decoder_layers


def ids(n=600, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def config(**kw):
    base = dict(method="block-influence", pattern="structured", sparsity=0.34, num_calibration_samples=4, seqlen=32)
    base.update(kw)
    return PruningConfig(**base)


def bypass(module, args, kwargs, output):
    """A decoder layer that passes its input through (its residual contribution zeroed)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def test_influence_is_one_minus_the_mean_cosine_of_a_layers_input_and_output():
    from optimum_prune import calibration_windows

    model = tiny_model("llama", num_hidden_layers=4)
    cfg = config(sparsity=0.25, method_kwargs={"keep_ends": False})
    windows = calibration_windows(ids(), None, cfg.num_calibration_samples, cfg.seqlen, cfg.seed)  # what the prune draws
    with torch.no_grad():
        states = model(windows, output_hidden_states=True).hidden_states  # input of layer i: states[i]
    expected = [1 - float(torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1).mean())
                for i in range(3)]  # the last entry of hidden_states is after the final norm
    pruner = Pruner(cfg)
    pruner.prune(model, ids(), progress=False)
    assert pruner.report.layer_influence[:3] == pytest.approx(expected, rel=1e-6)
    assert pruner.report.removed_layers == [min(range(4), key=lambda i: pruner.report.layer_influence[i])]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_removed_layer_equals_a_layer_that_passes_its_input_through(family):
    dense, pruned = build(family), build(family)
    pruner = Pruner(config(sparsity=0.5, method_kwargs={"keep_ends": False}))
    pruner.prune(pruned, ids(), progress=False)
    removed = pruner.report.removed_layers
    assert len(removed) == 1 and pruned.config.num_hidden_layers == dense.config.num_hidden_layers - 1
    _, layers = find_decoder_layers(dense)
    handles = [layers[i].register_forward_hook(bypass, with_kwargs=True) for i in removed]
    x = ids(16, seed=1).view(1, 16)
    with torch.no_grad():
        expected, got = dense(x).logits, pruned(x).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_budget_ends_and_ignore():
    model = tiny_model("llama", num_hidden_layers=6)
    pruner = Pruner(config(sparsity=0.34))
    pruner.prune(model, ids(), progress=False)
    removed = pruner.report.removed_layers
    assert len(removed) == 2 and 0 not in removed and 5 not in removed  # keep_ends
    assert pruner.report.overall_sparsity == pytest.approx(2 / 6)
    kept = Pruner(config(sparsity=0.34, ignore=["model.layers.1", "model.layers.2"]))
    kept.prune(tiny_model("llama", num_hidden_layers=6), ids(), progress=False)
    assert not {1, 2} & set(kept.report.removed_layers) and len(kept.report.removed_layers) == 2
    with pytest.raises(PruningError, match="less than half a layer"):
        Pruner(config(sparsity=0.05)).prune(tiny_model("llama", num_hidden_layers=6), ids(), progress=False)
    with pytest.raises(PruningError, match="overrides do not apply"):
        Pruner(config(overrides={"model.layers.1": {"sparsity": 0.5}})).prune(tiny_model("llama"), ids(), progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_saved_stock_checkpoint_loads_in_a_fresh_interpreter(tmp_path, family):
    """Fewer layers, a stock config (layer_types follow the kept layers): the stock class loads it
    without optimum-prune, with identical logits and greedy generation."""
    model = build(family)
    if family == "llama":
        model = tiny_model("llama", num_hidden_layers=4)
    pruner = Pruner(config(sparsity=0.25 if family == "llama" else 0.5, method_kwargs={"keep_ends": False}))
    pruner.prune(model, ids(), progress=False)
    pruner.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == family and saved["num_hidden_layers"] == model.config.num_hidden_layers
    assert "auto_map" not in saved and not (tmp_path / "out" / "modeling_pruned.py").exists()
    x = ids(12, seed=2).view(1, 12)
    with torch.no_grad():
        torch.save({"logits": model(x).logits, "greedy": model.generate(x, max_new_tokens=6, do_sample=False)},
                   tmp_path / "ref.pt")
    code = (
        "import sys, torch; sys.modules['optimum_prune'] = None\n"  # as on a machine without it
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}); x = torch.arange(12).view(1, 12)\n"
        f"x = {x.tolist()!r}; x = torch.tensor(x)\n"
        "with torch.no_grad():\n"
        "    same = torch.equal(m(x).logits, ref['logits'])\n"
        "    gen = torch.equal(m.generate(x, max_new_tokens=6, do_sample=False), ref['greedy'])\n"
        "print(type(m).__module__.startswith('transformers.models'), same, gen)\n"
    )
    assert python_stdout(code).split() == ["True", "True", "True"]


def test_cli_depth_prune_records_the_removed_layers(tmp_path):
    import subprocess
    import sys

    from conftest import make_texts, make_tokenizer

    tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(40)))
    done = subprocess.run([sys.executable, "-m", "optimum_prune.commands", "--model", str(tmp_path / "tiny"),
                           "--method", "shortgpt", "--pattern", "structured", "--sparsity", "0.25",
                           "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32",
                           "--output", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert len(results["removed_layers"]) == 1 and results["removed_layers"][0] in (1, 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert "decoder layers removed" in (tmp_path / "out" / "README.md").read_text()
    assert "decoder layers (1 removed" in done.stdout
