"""Structured pruning of mixture-of-experts models, for every MoE family of tests/families.py.

Whole experts (``expert-drop``: REAP, frequency, random): the experts and router rows go, the counts
the modules and the config hold follow, a removed expert behaves as if the router could never choose
it, the scores are what the papers define. Narrower experts (a layer-wise structured method on a MoE
family): every expert loses the same number of its own channels, which computes what the dense
model computes with those channels zeroed; FASP restores each expert's down projection. Both kinds
of smaller models load in a fresh interpreter (stock classes when every layer is alike, ours otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from families import build
from test_structured import BLOCK_PLUGIN

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.calibration.capture import ExpertUsageCollector
from optimum_prune.structure.layers import find_decoder_layers
from optimum_prune.structure.moe import (expert_channel_modules, expert_count_key, expert_width_key, moe_blocks,
                                        narrow_experts, remove_experts)
from optimum_prune.structure.shrink import replace_param

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "olmoe"]


def calibration(n=2000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0))


def config(**kw):
    base = dict(method="expert-drop", pattern="structured", sparsity=0.5, num_calibration_samples=4, seqlen=32)
    base.update(kw)
    return PruningConfig(**base)


def blocks_of(model):
    prefix, layers = find_decoder_layers(model)
    return [b for i, layer in enumerate(layers) for b in moe_blocks(layer, f"{prefix}.{i}")]


def params(model):
    return sum(p.numel() for p in model.parameters())


def test_scores_are_the_router_weighted_expert_output_norms():
    """REAP's saliency by hand for Mixtral: for every token and each expert the router chose,
    routing weight * ||the expert's SwiGLU output||, summed per expert; frequency = tokens routed."""
    model = build("mixtral")
    block = blocks_of(model)[0]
    seen = {}
    block.experts.register_forward_pre_hook(lambda m, args: None if "args" in seen else seen.update(args=args))
    collector = ExpertUsageCollector([block])
    ids = calibration(64).view(2, 32)
    with torch.no_grad():
        model(ids)
    collector.remove()
    hidden, index, weights = seen["args"]
    experts = block.experts
    tokens, reap = torch.zeros(experts.num_experts), torch.zeros(experts.num_experts, dtype=torch.float64)
    torch.set_grad_enabled(False)
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
            out = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            tokens[e] += 1
            reap[e] += float(weights[t, slot]) * float(out.norm())
    torch.set_grad_enabled(True)
    assert torch.equal(collector.tokens[block.name].float(), tokens) and tokens.sum() == 64 * 2
    torch.testing.assert_close(collector.weighted_norm[block.name], reap, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", ["reap", "frequency", "random"])
def test_the_lowest_scores_are_removed(score):
    model = build("qwen3_moe")
    pruner = Pruner(config(method_kwargs={"score": score}, sparsity=0.25 if score != "random" else 0.5))
    windows = calibration()[:128].view(4, 32)
    dense = build("qwen3_moe")
    collector = ExpertUsageCollector(blocks_of(dense))  # the dense model's scores: layer 0 sees the same tokens
    with torch.no_grad():
        dense(windows)
    collector.remove()
    pruner.prune(model, windows, progress=False)
    first = blocks_of(dense)[0].name
    removed = pruner.report.removed_experts[first]
    if score == "reap":
        expected = int(torch.argmin(collector.weighted_norm[first] / collector.tokens[first].clamp(min=1)))
        assert removed == [expected]
    elif score == "frequency":
        assert removed == [int(torch.argmin(collector.tokens[first]))]
    else:  # seeded: the same experts every time, different seeds differ somewhere
        again = Pruner(config(method_kwargs={"score": "random"}))
        again.prune(build("qwen3_moe"), None, progress=False)
        assert again.report.removed_experts == pruner.report.removed_experts
        seeds = {json.dumps(_random_choice(seed)) for seed in range(6)}
        assert len(seeds) > 1


def _random_choice(seed):
    pruner = Pruner(config(method_kwargs={"score": "random", "seed": seed}))
    pruner.prune(build("qwen3_moe"), None, progress=False)
    return pruner.report.removed_experts


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_a_removed_expert_is_one_the_router_can_never_choose(family):
    """gpt-oss (top-k of logits with a router bias) and DeepSeek-V3 (top-k of sigmoid scores plus a
    routing bias): removing experts computes exactly what the dense model computes when those
    experts' biases are -inf."""
    model, reference = build(family), build(family)
    keep = torch.tensor([0, 2, 3])
    for block, ref in zip(blocks_of(model), blocks_of(reference)):
        remove_experts(block, keep, replace_param)
        bias = ref.router.bias if family == "gpt_oss" else ref.router.e_score_correction_bias
        with torch.no_grad():
            bias[1] = float("-inf")
    ids = calibration(24).view(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_softmax_routers_route_untouched_tokens_as_before():
    """Mixtral (softmax, top-k, renormalised): a token whose top-k avoided the removed experts gets
    exactly the same block output."""
    model = build("mixtral")
    dense = build("mixtral")
    block, dense_block = blocks_of(model)[0], blocks_of(dense)[0]
    remove_experts(block, torch.tensor([0, 1, 3]), replace_param)
    assert block.num_experts == block.experts.num_experts == block.router.num_experts == 3
    hidden = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chosen = dense_block.router(hidden.view(-1, 64))[2]
        untouched = ~(chosen == 2).any(-1)
        out, dense_out = block.module(hidden), dense_block.module(hidden)
    assert 0 < int(untouched.sum()) < 40
    torch.testing.assert_close(out.view(40, -1)[untouched], dense_out.view(40, -1)[untouched], rtol=1e-5, atol=1e-6)


def test_grouped_routing_loses_experts_evenly_per_group():
    import transformers

    from families import SMALL

    cfg = transformers.DeepseekV3Config(**SMALL, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                                        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    pruner = Pruner(config(sparsity=0.25))
    pruner.prune(model, calibration(), progress=False)
    for removed in pruner.report.removed_experts.values():
        assert len(removed) == 2 and sum(e < 4 for e in removed) == 1  # one from each group of 4
    assert model.config.n_routed_experts == 6
    # the count rounds to a whole number of experts per group: 12.5% of 8 is one expert per group
    cfg.n_routed_experts = 8
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    pruner = Pruner(config(sparsity=0.125))
    pruner.prune(model, calibration(), progress=False)
    assert all(len(removed) == 2 for removed in pruner.report.removed_experts.values())
    cfg.n_routed_experts = 8
    with pytest.raises(PruningError, match="fewer than 2 in a group"):
        Pruner(config(sparsity=0.75)).prune(transformers.AutoModelForCausalLM.from_config(cfg), calibration(),
                                            progress=False)


def test_refusals_name_the_fix():
    with pytest.raises(PruningError, match="fewer than the 2 each token is routed to"):
        Pruner(config(sparsity=0.75)).prune(build("mixtral"), calibration(), progress=False)
    with pytest.raises(PruningError, match="no decoder layer of this llama model has one.*fasp"):
        Pruner(config()).prune(build("llama"), calibration(), progress=False)


def test_resume_replays_the_removed_experts(tmp_path):
    from conftest import prune_interrupted

    cfg = config()
    reference, resumed = build("olmoe"), build("olmoe")
    Pruner(cfg).prune(reference, calibration(), progress=False)
    prune_interrupted(cfg, build("olmoe"), calibration(), 1, checkpoint_dir=tmp_path / "ckpt")
    Pruner(cfg).prune(resumed, calibration(), progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert reference.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


LOAD_MANY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
results = {}
for folder, kwargs in json.loads(sys.argv[2]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    results[folder] = {'logits': logits, 'generated': generated, 'class': type(model).__name__,
                       'params': sum(p.numel() for p in model.parameters())}
torch.save(results, sys.argv[3])
"""


def channels_of(model):
    prefix, layers = find_decoder_layers(model)
    return [c for i, layer in enumerate(layers) for c in expert_channel_modules(layer, f"{prefix}.{i}")]


KINDS = {  # how each kind of smaller MoE is made, uniform and with layer 0 pruned less
    "drop": lambda overrides: config(overrides=overrides),
    "channels": lambda overrides: config(method="fasp", channel_multiple=1, overrides=overrides),
}


def test_smaller_moes_save_and_load_in_a_fresh_process(tmp_path):
    """Every MoE family, both kinds: every layer keeping 2 of 4 experts / half of each expert's
    channels (stock classes, the config's count or width changed) or layer 0 keeping more (our
    classes, ``layer_widths``): fewer parameters, and an interpreter without optimum-prune computes
    the same logits (to float rounding) and greedy generation."""
    from conftest import make_tokenizer

    ids = calibration(10).unsqueeze(0)
    torch.save(ids, tmp_path / "ids.pt")
    expected, folders = {}, {}
    for family in MOE:
        for kind, make in KINDS.items():
            for widths in ("uniform", "heterogeneous"):
                model = build(family)
                before = params(model)
                heterogeneous = widths == "heterogeneous"
                pruner = Pruner(make({"*.layers.0.mlp": {"sparsity": 0.25}} if heterogeneous else {}))
                pruner.prune(model, calibration(), progress=False)
                assert type(model).__name__.startswith("Pruned") == heterogeneous, (family, kind, widths)
                if kind == "drop":
                    key, sizes, full = expert_count_key(model.config), [b.num_experts for b in blocks_of(model)], 4
                else:
                    key, sizes = expert_width_key(model.config), [c.width for c in channels_of(model)]
                    full = build(family).config.to_dict()[key]
                assert sizes == ([full - full // 4, full // 2] if heterogeneous else [full // 2] * 2), (family, sizes)
                assert getattr(model.config, key) == (full if heterogeneous else full // 2), (family, kind)
                assert params(model) < before
                folder = str(tmp_path / f"{family}-{kind}-{widths}")
                pruner.save_pretrained(folder, tokenizer=make_tokenizer())
                folders[folder] = {"trust_remote_code": True} if heterogeneous else {}
                with torch.no_grad():
                    expected[folder] = (model(ids).logits, model.generate(ids, max_new_tokens=5, do_sample=False),
                                        type(model).__name__, params(model))
    script = tmp_path / "load.py"
    script.write_text(BLOCK_PLUGIN + LOAD_MANY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), json.dumps(folders),
                             str(tmp_path / "loaded.pt")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for folder, (logits, generated, cls, count) in expected.items():
        got = loaded[folder]
        assert got["class"] == cls and got["params"] == count, folder
        # equal up to float rounding (summation order may differ between interpreters: measured <= 3e-8)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-6, atol=1e-6, msg=folder)
        assert torch.equal(got["generated"], generated), folder


@pytest.mark.parametrize("family", MOE)
def test_narrowing_experts_equals_zeroing_their_channels(family):
    """Keeping every other channel of every expert computes exactly what the dense model computes
    with the other channels' down-projection columns zeroed (concatenated and interleaved gate/up,
    transposed banks, biases)."""
    model, dense = build(family), build(family)
    for channels, reference in zip(channels_of(model), channels_of(dense)):
        keep = torch.arange(0, channels.width, 2)
        dropped = torch.arange(1, channels.width, 2)
        rows = channels.kept_rows(keep)
        up = torch.stack([channels.up.tensor[e].T[rows].T if channels.up.transposed else channels.up.tensor[e][rows]
                          for e in range(channels.num_experts)]).detach()
        down = channels.down.tensor.detach()
        down = down[:, keep, :] if channels.down.transposed else down[:, :, keep]
        bias_name = channels.bias(channels.up)
        bias = getattr(channels.module, bias_name).detach()[:, rows] if bias_name else None
        narrow_experts(channels, up, down, bias, replace_param)
        assert channels.width == keep.numel()
        with torch.no_grad():
            if reference.down.transposed:
                reference.down.tensor[:, dropped, :] = 0
            else:
                reference.down.tensor[:, :, dropped] = 0
    ids = calibration(24).view(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_fasp_restores_each_experts_down_projection():
    """Restoring each expert's down projection on its kept channels (least squares on the expert's
    own tokens) keeps the model closer to the dense one than slicing it."""
    windows = calibration()[:256].view(8, 32)
    dense = build("mixtral")
    with torch.no_grad():
        reference = dense(windows).logits
    errors = {}
    for restore in (True, False):
        model = build("mixtral")
        Pruner(config(method="fasp", channel_multiple=1, method_kwargs={"restore": restore})).prune(
            model, windows, progress=False)
        with torch.no_grad():
            errors[restore] = float((model(windows).logits - reference).square().mean())
    assert errors[True] < 0.8 * errors[False], errors


def test_experts_with_too_few_tokens_are_narrowed_by_magnitude():
    model = build("qwen3_moe")
    pruner = Pruner(config(method="fasp", channel_multiple=1, min_expert_tokens=10**6))
    pruner.prune(model, calibration(), progress=False)
    assert pruner.report.expert_fallbacks == {c.name: 4 for c in channels_of(model)}
    assert all(c.width == 32 for c in channels_of(model))


def test_resume_replays_the_narrowed_experts(tmp_path):
    from conftest import prune_interrupted

    cfg = config(method="fasp", channel_multiple=1)
    reference, resumed = build("gpt_oss"), build("gpt_oss")
    Pruner(cfg).prune(reference, calibration(), progress=False)
    prune_interrupted(cfg, build("gpt_oss"), calibration(), 1, checkpoint_dir=tmp_path / "ckpt")
    Pruner(cfg).prune(resumed, calibration(), progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_whole_model_methods_refuse_moe_families_in_one_line():
    with pytest.raises(PruningError, match="experts of fused MoE models, with a layer-wise method"):
        Pruner(config(method="policy_gradient")).prune(build("mixtral"), calibration(), progress=False)


def test_cli_removes_experts(tmp_path, capsys):
    from conftest import make_texts, make_tokenizer

    from optimum_prune.commands.prune import main

    build("mixtral").save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    out = tmp_path / "out"
    code = main(["--model", str(tmp_path / "moe"), "--method", "expert-drop", "--pattern", "structured",
                 "--sparsity", "0.5", "--method-kwargs", '{"score": "frequency"}', "--dataset",
                 str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress",
                 "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 experts removed" in captured.out
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    results = json.loads((out / "pruning_results.json").read_text())
    assert sorted(results["removed_experts"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(len(v) == 2 for v in results["removed_experts"].values())
    assert "4 routed experts removed from 2 MoE blocks" in (out / "README.md").read_text()
