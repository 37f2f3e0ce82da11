"""Fused mixture-of-experts banks as pruning targets (issue #23): each expert is solved with the
statistics of the tokens routed to it (or of every token), rare experts fall back to magnitude and
are counted, the methods see 2-D problems, and checkpoints, offload and the model's experts
implementation survive it."""

from __future__ import annotations

import pytest
import torch
from conftest import prune_interrupted
from families import build

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.calibration.capture import ExpertCollector
from optimum_prune.structure.experts import expert_banks, expert_matrix

MOE = ["mixtral", "gpt_oss", "qwen3_moe", "deepseek_v3"]


def calibration(n=2000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def config(**kw):
    return PruningConfig(**{"method": "sparsegpt", "sparsity": 0.5, "num_calibration_samples": 4, "seqlen": 32, **kw})


def experts_of(model, index=0):
    return model.model.layers[index].mlp.experts


def reference_inputs(model, ids):
    """Per expert of layer 0, the inputs of its two matrices computed by hand from what the experts
    module receives: the hidden states of the tokens routed to it, and ``_apply_gate`` of its
    gate/up product on them (the input of its down projection)."""
    experts = experts_of(model)
    seen = {}

    def hook(module, args, kwargs):
        names = ["hidden_states", "top_k_index", "top_k_weights"]
        bound = dict(zip(names, args), **kwargs)
        values = list(bound.values())
        seen["hidden"], seen["index"] = values[0], values[1]

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    banks = expert_banks(model.model.layers[0], "model.layers.0", None, [])
    gate_up, down = (next(b for n, b in banks.items() if n.endswith(p)) for p in ("gate_up_proj", "down_proj"))
    inputs = {gate_up.name: [], down.name: []}
    for e in range(gate_up.num_experts):
        tokens = (seen["index"] == e).any(-1)
        x = seen["hidden"][tokens]
        out = x @ expert_matrix(gate_up, e).T
        if getattr(experts, "has_bias", False):
            out = out + experts.gate_up_proj_bias[e]
        inputs[gate_up.name].append(x)
        inputs[down.name].append(experts._apply_gate(out))
    return banks, inputs


@pytest.mark.parametrize("family", MOE)
def test_each_expert_sees_the_tokens_routed_to_it(family):
    model = build(family)
    ids = calibration(64).view(2, 32)
    banks, expected = reference_inputs(model, ids)
    collector = ExpertCollector(list(banks.values()), frozenset({"gram"}), "cpu")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        collector.remove()
    collector.check()
    for name, per_expert in expected.items():
        for e, x in enumerate(per_expert):
            stats = collector.stats[name][e]
            assert stats.count == x.shape[0] == int(collector.routed[name][e])
            if x.shape[0]:
                torch.testing.assert_close(stats.gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_all_tokens_mode_sees_every_token_and_leaves_the_output_unchanged(family):
    model = build(family)
    ids = calibration(64).view(2, 32)
    with torch.no_grad():
        dense = model(ids).logits
    banks = list(expert_banks(model.model.layers[0], "model.layers.0", None, []).values())
    collector = ExpertCollector(banks, frozenset({"sq_norm"}), "cpu", all_tokens=True)
    try:
        with torch.no_grad():
            widened = model(ids).logits
    finally:
        collector.remove()
    collector.check()
    torch.testing.assert_close(widened, dense, rtol=1e-5, atol=1e-6)
    for bank in banks:
        assert [s.count for s in collector.stats[bank.name]] == [ids.numel()] * bank.num_experts


def test_the_models_experts_implementation_is_kept():
    model = build("gpt_oss")
    before = model.config._experts_implementation
    Pruner(config()).prune(model, calibration(), progress=False)
    assert model.config._experts_implementation == before


def test_rare_experts_fall_back_to_magnitude_and_are_counted():
    """gpt-oss's router has a bias: -1e4 on expert 3 means no token is routed to it."""
    model = build("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4
    pruner = Pruner(config())
    pruner.prune(model, calibration(), progress=False)
    fallbacks = pruner.report.expert_fallbacks
    assert fallbacks == {f"model.layers.{i}.mlp.experts.{p}": 1 for i in range(2) for p in ("gate_up_proj", "down_proj")}
    starved = expert_matrix(expert_banks(model.model.layers[0], "model.layers.0", None, [])[
        "model.layers.0.mlp.experts.down_proj"], 3)
    assert float((starved == 0).float().mean()) == pytest.approx(0.5, abs=0.01)

    # every token calibrates every expert: no fallback
    model = build("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4
    pruner = Pruner(config(expert_calibration="all"))
    pruner.prune(model, calibration(), progress=False)
    assert pruner.report.expert_fallbacks == {}


def test_min_expert_tokens_sends_every_expert_to_magnitude():
    by_threshold, by_magnitude = build("mixtral"), build("mixtral")
    Pruner(config(min_expert_tokens=10**9, ignore=["*self_attn*"])).prune(by_threshold, calibration(), progress=False)
    Pruner(config(method="magnitude", ignore=["*self_attn*"])).prune(by_magnitude, calibration(), progress=False)
    for i in range(2):
        for p in ("gate_up_proj", "down_proj"):
            a, b = getattr(experts_of(by_threshold, i), p), getattr(experts_of(by_magnitude, i), p)
            assert torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_each_expert_is_solved_on_its_own_tokens(family):
    """The objective of every expert, ||(W - W') X_e||^2 on the tokens routed to it, is lower with
    SparseGPT (which solves that problem) than with magnitude at the same sparsity."""
    ids = calibration()
    windows = ids[: 4 * 32].view(4, 32)
    errors = {}
    for method in ("sparsegpt", "magnitude"):
        dense, model = build(family), build(family)
        Pruner(config(method=method, ignore=["*self_attn*"])).prune(model, windows, progress=False)
        banks, inputs = reference_inputs(dense, windows)
        pruned = expert_banks(model.model.layers[0], "model.layers.0", None, [])
        errors[method] = [
            float(((expert_matrix(bank, e) - expert_matrix(pruned[name], e)) @ x.T).square().sum().detach())
            for name, bank in banks.items() for e, x in enumerate(inputs[name]) if x.shape[0] >= 16
        ]
    assert errors["sparsegpt"] and all(s < m for s, m in zip(errors["sparsegpt"], errors["magnitude"])), errors


def test_methods_receive_two_dimensional_problems(monkeypatch):
    from optimum_prune.methods.sparsegpt import SparseGPT

    shapes = []
    original = SparseGPT.prune_linears

    def spy(self, weights, stats, target):
        shapes.extend(tuple(w.shape) for w in weights)
        return original(self, weights, stats, target)

    monkeypatch.setattr(SparseGPT, "prune_linears", spy)
    model = build("gpt_oss")
    Pruner(config()).prune(model, calibration(), progress=False)
    assert all(len(shape) == 2 for shape in shapes)
    # gpt-oss stores [experts, in, out]: the method sees [out, in] = [2 * intermediate, hidden] and [hidden, intermediate]
    assert (128, 64) in shapes and (64, 64) in shapes


def test_resume_replays_the_experts(tmp_path):
    cfg = config(method="wanda")
    reference, resumed = build("mixtral"), build("mixtral")
    Pruner(cfg).prune(reference, calibration(), progress=False)
    prune_interrupted(cfg, build("mixtral"), calibration(), 1, checkpoint_dir=tmp_path / "ckpt")
    pruner = Pruner(cfg)
    pruner.prune(resumed, calibration(), progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_offloaded_experts_are_pruned_like_resident_ones(tmp_path):
    from accelerate import dispatch_model

    reference = build("mixtral")
    Pruner(config()).prune(reference, calibration(), progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    model = dispatch_model(build("mixtral"), device_map=device_map, offload_dir=str(tmp_path / "off"), main_device="cpu")
    Pruner(config()).prune(model, calibration(), progress=False)
    ids = calibration(32).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_error_correction_with_one_pass_is_refused_for_experts():
    with pytest.raises(PruningError, match="sequential mode"):
        Pruner(config(method="fista", sequential=False)).prune(build("mixtral"), calibration(), progress=False)


def test_expert_calibration_is_validated():
    with pytest.raises(PruningError, match="expert_calibration must be one of routed, all"):
        config(expert_calibration="every")
    with pytest.raises(PruningError, match="min_expert_tokens"):
        config(min_expert_tokens=-1)


def test_cli_reports_the_experts(tmp_path, capsys):
    import json

    from conftest import make_texts, make_tokenizer

    from optimum_prune.commands.prune import main

    build("mixtral").save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    code = main(["--model", str(tmp_path / "moe"), "--method", "wanda", "--dataset", str(tmp_path / "calib.txt"),
                 "--num-samples", "4", "--seqlen", "32", "--expert-calibration", "all", "--min-expert-tokens", "4",
                 "--no-progress", "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "16 expert matrices" in captured.out and "% of the decoder layers' weights" in captured.out
    assert "routers and gates, on purpose: model.layers.*.mlp.gate.weight" in captured.out  # the rest, named
    assert "warning" not in captured.err
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert (saved["expert_calibration"], saved["min_expert_tokens"]) == ("all", 4)
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert 0.99 < results["coverage"] < 1.0  # every matrix but the routers, which are named
    assert sorted(results["router_weights"]) == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert results["experts"] == {"matrices": 16, "calibration": "all", "min_tokens": 4, "magnitude_fallbacks": 0}
    assert "16 expert matrices of fused banks, each solved on every calibration token" in (
        tmp_path / "out" / "README.md").read_text()
