"""Every family of tests/families.py x {magnitude, wanda, sparsegpt, alps} x {50%, 2:4}: each targeted
tensor (the experts of fused MoE banks included, one expert matrix at a time) reaches the requested
sparsity, the zeros counted in the model agree with the report, and the prune covers every weight
matrix of the decoder layers. docs/architectures.md shows the table these models give."""

from __future__ import annotations

import pytest
import torch
import families
from families import BEGIN, DOCS, END, FAMILIES, UNSUPPORTED_EXPERTS, build, support_row, support_table

from optimum_prune import Pruner, PruningConfig
from optimum_prune.structure.experts import expert_banks, expert_matrix
from optimum_prune.structure.layers import find_decoder_layers, is_router

METHODS = ["magnitude", "wanda", "sparsegpt", "alps"]
PATTERNS = ["unstructured", "2:4"]


def calibration(n=2000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0))


def prune(model, method, pattern, **kw):
    cfg = PruningConfig(method=method, pattern=pattern, sparsity=None if pattern == "2:4" else 0.5,
                        num_calibration_samples=4, seqlen=32,
                        method_kwargs={"max_iter": 20} if method == "alps" else {}, **kw)
    pruner = Pruner(cfg)
    pruner.prune(model, calibration(), progress=False)
    return pruner.report


def targeted_matrices(model):
    """name -> list of 2-D [out, in] matrices: each Linear's weight, each expert of each bank."""
    prefix, layers = find_decoder_layers(model)
    found = {}
    for i, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and not is_router(module, sub, layer):
                found[f"{prefix}.{i}.{sub}"] = [module.weight.detach()]
        for name, bank in expert_banks(layer, f"{prefix}.{i}", None, []).items():
            found[name] = [expert_matrix(bank, e).detach() for e in range(bank.num_experts)]
    return found


def layer_zeros(model):
    """(zeros, weights) over the decoder layers' matrices, routers and biases left out."""
    prefix, layers = find_decoder_layers(model)
    zeros = total = 0
    for layer in layers:
        for sub, module in layer.named_modules():
            if is_router(module, sub, layer):
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.dim() >= 2 and not name.endswith("bias"):
                    zeros += int((p == 0).sum())
                    total += p.numel()
    return zeros, total


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_targeted_tensor_reaches_the_sparsity(family, method, pattern):
    model = build(family)
    report = prune(model, method, pattern)
    matrices = targeted_matrices(model)
    assert set(report.sparsity) == set(matrices)  # nothing targeted is missing from the report, nothing extra
    for name, mats in matrices.items():
        for matrix in mats:
            if pattern == "2:4":  # at most 2 non-zeros in every 4 consecutive inputs of a row
                groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(-1)
                assert int(groups.max()) <= 2, name
            else:  # per-row or per-matrix budgets of 50%, within rounding
                assert float((matrix == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
    assert families.fully_covered(report)
    zeros, total = layer_zeros(model)
    assert report.total_params == total
    assert zeros / total == pytest.approx(report.overall_sparsity, abs=0.002)  # the report says what the model holds


def test_unsupported_experts_are_reported_not_overstated():
    model = build("llama4_text")
    report = prune(model, "wanda", "unstructured")
    zeros, total = layer_zeros(model)
    assert report.unhandled and all("experts" in name for name in report.unhandled)
    assert report.coverage < 0.5
    assert report.overall_sparsity * report.coverage == pytest.approx(zeros / total, rel=0.01)
    assert set(UNSUPPORTED_EXPERTS) == {"llama4_text"}


def test_architectures_page_matches_the_models():
    page = open(DOCS).read()
    assert BEGIN in page and END in page, "docs/architectures.md lost its table markers"
    table = page.split(BEGIN)[1].split(END)[0].strip()
    assert table == support_table(), "docs/architectures.md is stale: run `python tests/families.py`"


STRUCTURED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox"]


@pytest.mark.parametrize("family", STRUCTURED)
def test_shrinking_equals_zeroing_the_removed_units(family):
    """Removing every other unit of each channel group computes exactly what the dense model
    computes with those units' consumer columns zeroed (fused Linears: each slice loses the same units)."""
    from optimum_prune.structure.groups import layer_groups, unit_indices
    from optimum_prune.structure.shrink import describe_widths, shrink_group

    model, dense = build(family), build(family)
    prefix, layers = find_decoder_layers(model)
    for group in layer_groups(model, layers[0], f"{prefix}.0", 0):
        keep = torch.arange(0, group.units, 2)
        dropped = torch.tensor(sorted(set(range(group.units)) - set(keep.tolist())))
        with torch.no_grad():
            dict(dense.named_modules())[group.consumer_name].weight[:, unit_indices(dropped, group.cols_per_unit)] = 0
        weights = {p.name: p.linear.weight.detach().float() for p in group.producers}
        weights[group.consumer_name] = group.consumer.weight.detach().float()
        weights.update({p.name + ".bias": p.linear.bias.detach().float() for p in group.producers
                        if p.linear.bias is not None})
        shrink_group(group, keep, weights)
        assert group.consumer.in_features == keep.numel() * group.cols_per_unit
    describe_widths(model)  # layer 0 narrower than the others: the widths the modules read
    ids = calibration(20).view(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_structured_families_are_the_documented_ones():
    assert [f for f in FAMILIES if support_row(f)["structured"] == "yes"] == STRUCTURED


@pytest.mark.parametrize("widths", ["uniform", "heterogeneous"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "gpt_neox"])
def test_structured_saves_and_loads_in_a_fresh_process(family, widths, tmp_path):
    """Gemma-2/3 (explicit head_dim, q/k norms, sliding-window layers, tied embeddings) and Phi-3
    (fused qkv_proj and gate_up_proj), GPT-NeoX (MLP only): fewer parameters, and a fresh interpreter without
    optimum-prune loads the folder and computes the same logits and greedy generation (stock classes
    when every layer has the same widths)."""
    from conftest import make_tokenizer
    from test_structured import load_elsewhere

    model = build(family)
    before = sum(p.numel() for p in model.parameters())
    overrides = {"*.layers.0": {"sparsity": 0.45}} if widths == "heterogeneous" else {}
    pruner = Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=0.3, channel_multiple=1,
                                  num_calibration_samples=4, seqlen=32, overrides=overrides))
    pruner.prune(model, calibration(), progress=False)
    assert sum(p.numel() for p in model.parameters()) < 0.85 * before
    heterogeneous = widths == "heterogeneous"
    assert type(model).__name__.startswith("Pruned") == heterogeneous
    folder = str(tmp_path / "pruned")
    pruner.save_pretrained(folder, tokenizer=make_tokenizer())
    ids = calibration(12).unsqueeze(0)
    torch.save(ids, tmp_path / "ids.pt")
    loaded = load_elsewhere(folder, {"trust_remote_code": True} if heterogeneous else {}, block_plugin=True)
    assert loaded["class"] == type(model).__name__
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], model(ids).logits, rtol=0, atol=0)
    assert torch.equal(loaded["generated"], model.generate(ids, max_new_tokens=6, do_sample=False))
