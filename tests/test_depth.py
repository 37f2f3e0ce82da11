"""Depth pruning (`block-influence`, ShortGPT): whole decoder layers removed, the least influential
first. Influence is ``1 - mean cos(layer input, layer output)`` measured on the dense model; a
removed layer behaves as if it passed its input through (identical logits) for every family of
tests/families.py; the result is a stock checkpoint with fewer layers that loads anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import python_stdout, text_windows, tiny_model
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
    with pytest.raises(PruningError, match="less than half of the smallest layer"):
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


# ------------------------------------------------------------------------------------------------ blocks
BLOCK_FAMILIES = sorted(f for f in FAMILIES if f != "opt")


def zero_output(module, args, output):
    """A block whose contribution to the residual stream is zeroed."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@pytest.mark.parametrize("granularity", ["attention", "mlp"])
@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_a_removed_block_equals_a_block_whose_output_is_zeroed(family, granularity):
    """The pruned model (the block absent, its norms too) computes the dense model's logits with that
    block's output replaced by zeros; it is saved and reloaded with identical logits."""
    dense, pruned = build(family), build(family)
    pruner = Pruner(config(sparsity=0.49, ignore=["*.layers.0"],  # one candidate: the block of layer 1
                           method_kwargs={"keep_ends": False, "granularity": granularity}))
    pruner.prune(pruned, ids(), progress=False)
    removed = pruner.report.removed_blocks
    assert len(removed) == 1 and removed[0].rsplit(".", 1)[-1] in ("self_attn", "attention", "mlp")
    assert pruner.report.removed_layers == [] and pruned.config.num_hidden_layers == dense.config.num_hidden_layers
    index = int(removed[0].split(".")[-2])
    assert pruned.config.layer_widths[index]["no_op"] == [granularity]
    handle = dense.get_submodule(removed[0]).register_forward_hook(zero_output)
    x = ids(16, seed=1).view(1, 16)
    with torch.no_grad():
        expected, got = dense(x).logits, pruned(x).logits
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any(name.startswith(removed[0] + ".") for name, _ in pruned.named_parameters())


def test_block_influence_by_hand():
    """Attention block: ``1 - cos(h, h + a)``; MLP block: ``1 - cos(h + a, out)``, where ``h + a`` is the
    layer's output with its MLP zeroed."""
    from optimum_prune import calibration_windows

    model = tiny_model("llama", num_hidden_layers=4)
    cfg = config(sparsity=0.05, method_kwargs={"keep_ends": False, "granularity": "block"})
    windows = calibration_windows(ids(), None, cfg.num_calibration_samples, cfg.seqlen, cfg.seed)
    _, layers = find_decoder_layers(model)

    def cos(a, b):
        return 1 - float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())

    attention, mlp = [], []
    with torch.no_grad():
        states = model(windows, output_hidden_states=True).hidden_states
        for i in range(3):
            handle = layers[i].mlp.register_forward_hook(zero_output)
            middle = model(windows, output_hidden_states=True).hidden_states[i + 1]  # earlier layers unchanged
            handle.remove()
            attention.append(cos(states[i], middle))
            mlp.append(cos(middle, states[i + 1]))
    pruner = Pruner(cfg)
    pruner.prune(model, ids(), progress=False)
    assert pruner.report.block_influence["attention"][:3] == pytest.approx(attention, rel=1e-6)
    assert pruner.report.block_influence["mlp"][:3] == pytest.approx(mlp, rel=1e-6)
    # the budget (5% of the decoder: 7,398 parameters) holds half an attention block (12,352), not half an
    # MLP block (24,640): the least influential attention block goes, whatever the MLP blocks measure
    attention = {f"model.layers.{i}.self_attn": v for i, v in enumerate(pruner.report.block_influence["attention"])}
    assert pruner.report.removed_blocks == [min(attention, key=attention.get)]


def test_both_blocks_of_a_layer_make_a_removed_layer_and_refusals():
    model = tiny_model("llama", num_hidden_layers=4)
    pruner = Pruner(config(sparsity=0.99, method_kwargs={"keep_ends": False, "granularity": "block"}))
    pruner.prune(model, ids(), progress=False)
    # every block but one: three layers removed whole, the one left keeps a single block
    assert len(pruner.report.removed_layers) == 3 and len(pruner.report.removed_blocks) == 1
    assert model.config.num_hidden_layers == 1 and len(model.config.layer_widths[0]["no_op"]) == 1
    with pytest.raises(PruningError, match="granularity must be one of"):
        PruningConfig(method="block-influence", pattern="structured", sparsity=0.2,
                      method_kwargs={"granularity": "heads"})
    with pytest.raises(PruningError, match="use granularity=layer"):
        Pruner(config(method_kwargs={"granularity": "attention"})).prune(build("opt"), ids(), progress=False)
    ignored = Pruner(config(sparsity=0.2, ignore=["*.self_attn"], method_kwargs={"granularity": "block"}))
    ignored.prune(tiny_model("llama", num_hidden_layers=4), ids(), progress=False)
    assert ignored.report.removed_blocks and all(b.endswith(".mlp") for b in ignored.report.removed_blocks)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_saved_blocks_load_in_a_fresh_interpreter(tmp_path, family):
    """A layer without its attention block: the Nemotron-NAS form for Llama, optimum-prune's form for
    Gemma-2; loaded without optimum-prune (trust_remote_code), identical logits and greedy generation
    (the absent attention keeps the KV cache's length)."""
    model = tiny_model("llama", num_hidden_layers=4) if family == "llama" else build(family)
    pruner = Pruner(config(sparsity=0.05 if family == "llama" else 0.2,  # one attention block
                           method_kwargs={"keep_ends": False, "granularity": "attention"}))
    pruner.prune(model, ids(), progress=False)
    pruner.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    index = int(pruner.report.removed_blocks[0].split(".")[-2])
    if family == "llama":
        assert saved["model_type"] == "nemotron-nas" and saved["block_configs"][index]["attention"]["no_op"]
    else:
        assert saved["model_type"] == "optimum_pruned_gemma2" and saved["layer_widths"][index] == {"no_op": ["attention"]}
    x = ids(12, seed=2).view(1, 12)
    with torch.no_grad():
        torch.save({"logits": model(x).logits, "greedy": model.generate(x, max_new_tokens=6, do_sample=False)},
                   tmp_path / "ref.pt")
    code = (
        "import sys, torch; sys.modules['optimum_prune'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True).eval()\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}); x = torch.tensor({x.tolist()!r})\n"
        "with torch.no_grad():\n"
        "    same = torch.equal(m(x).logits, ref['logits'])\n"
        "    gen = torch.equal(m.generate(x, max_new_tokens=6, do_sample=False), ref['greedy'])\n"
        "print(same, gen)\n"
    )
    assert python_stdout(code).split() == ["True", "True"]


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_loss_score_is_the_loss_increase_of_removing_each_unit_alone(granularity):
    """score=loss: each unit's score is the next-token loss (over the first score_samples windows) of
    the model with that unit really removed minus the dense model's; the lowest within budget goes."""
    from optimum_prune import calibration_windows
    from optimum_prune.structure.shrink import remove_blocks, remove_layers

    options = {"keep_ends": False, "granularity": granularity, "score": "loss", "score_samples": 2}
    cfg = config(sparsity=0.34 if granularity == "layer" else 0.1, method_kwargs=options)
    windows = calibration_windows(ids(), None, cfg.num_calibration_samples, cfg.seqlen, cfg.seed)[:2]

    def loss(model):
        with torch.no_grad():
            return float(model(windows, labels=windows).loss)

    base = loss(tiny_model("llama", num_hidden_layers=3))
    expected = {}
    for index in range(3):
        for kind in (("layer",) if granularity == "layer" else ("attention", "mlp")):
            model = tiny_model("llama", num_hidden_layers=3)
            if kind == "layer":
                remove_layers(model, [index])
                expected[f"model.layers.{index}"] = loss(model) - base
            else:
                remove_blocks(model, [(index, kind)])
                expected[f"model.layers.{index}.{'self_attn' if kind == 'attention' else 'mlp'}"] = loss(model) - base
    pruner = Pruner(cfg)
    pruner.prune(tiny_model("llama", num_hidden_layers=3), ids(), progress=False)
    scores = pruner.report.unit_scores
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=1e-4, abs=1e-5)  # float32 losses of ~5.5
    fits = [name for name in scores if granularity == "layer" or not name.endswith(".mlp")]  # the budget's
    removed = ([f"model.layers.{i}" for i in pruner.report.removed_layers] if granularity == "layer"
               else pruner.report.removed_blocks)
    assert removed == [min(fits, key=scores.get)]
    with pytest.raises(PruningError, match="score must be influence or loss"):
        PruningConfig(method="block-influence", pattern="structured", sparsity=0.2, method_kwargs={"score": "cos"})


def test_reported_sparsity_times_coverage_is_the_fraction_of_the_decoder_removed():
    """granularity=attention ranks attention blocks only: the report's sparsity is over those, and its
    coverage says what share of the decoder they are; a second prune never picks a block already gone."""
    model = tiny_model("llama", num_hidden_layers=4)
    _, layers = find_decoder_layers(model)
    before = sum(p.numel() for layer in layers for p in layer.parameters())
    pruner = Pruner(config(sparsity=0.1, method_kwargs={"keep_ends": False, "granularity": "attention"}))
    pruner.prune(model, ids(), progress=False)
    _, layers = find_decoder_layers(model)
    after = sum(p.numel() for layer in layers for p in layer.parameters())
    report = pruner.report
    assert report.coverage < 1 and report.overall_sparsity * report.coverage == pytest.approx(1 - after / before)
    again = Pruner(config(sparsity=0.1, method_kwargs={"keep_ends": False, "granularity": "attention"}))
    again.prune(model, ids(), progress=False)
    assert not set(again.report.removed_blocks) & set(report.removed_blocks)


@pytest.mark.parametrize("granularity", ["layer", "block"])
@pytest.mark.parametrize("recovery", ["lora", "distill"])
def test_recovery_trains_the_shallower_model_which_keeps_its_depth_and_reloads(tmp_path, granularity, recovery):
    """Recovery after a depth prune (#39): LoRA (its training loss falls) and distillation from the
    dense model (its training loss and the held-out KL to the teacher fall; a removed layer's function
    is not learned back from a few hundred tokens, so by little) train the model whose layers or blocks
    went; the layers and left-out blocks stay as the prune left them and the recovered model reloads
    with identical logits."""
    import copy

    from transformers import AutoModelForCausalLM

    from optimum_prune.recovery import (DistillConfig, LoraRecoveryConfig, distillation_loss, recover_distill,
                                        recover_lora)

    dense = tiny_model("llama", num_hidden_layers=4, initializer_range=0.2)
    model = copy.deepcopy(dense)
    pruner = Pruner(config(sparsity=0.3, method_kwargs={"keep_ends": False, "granularity": granularity}))
    pruner.prune(model, text_windows(8, seed=1), progress=False)
    assert pruner.report.removed_layers or pruner.report.removed_blocks
    shape = (model.config.num_hidden_layers, getattr(model.config, "layer_widths", None))
    heldout, train = text_windows(8, seed=7), text_windows(32, seed=3)

    def heldout_kl():
        with torch.no_grad():
            return float(distillation_loss(model(heldout).logits, dense(heldout).logits))

    before = heldout_kl()
    if recovery == "lora":
        found = recover_lora(model, train, LoraRecoveryConfig(steps=40, lr=1e-2, rank=4, alpha=8), progress=False)
        assert found["loss_last"] < found["loss_first"], found
    else:
        found = recover_distill(model, dense, train, DistillConfig(steps=40, lr=1e-3, batch_size=4, ce_weight=0.0),
                                progress=False)
        assert found["loss_last"] < found["loss_first"] and heldout_kl() < before, (before, heldout_kl())
    assert (model.config.num_hidden_layers, getattr(model.config, "layer_widths", None)) == shape
    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == shape[0]
    with torch.no_grad():
        assert torch.equal(reloaded(heldout).logits, model(heldout).logits)
