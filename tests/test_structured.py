"""Structured pruning: channel groups, physical shrinking, budgets, FASP, and saving/loading the
smaller models (uniform -> stock classes; heterogeneous -> our classes, with and without the plugin)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, VOCAB, python_stdout, synthetic_structured_problem, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.methods.linalg import restore_columns
from optimum_prune.methods.structured import column_scores, keep_top
from optimum_prune.structure.groups import unit_indices
from optimum_prune.registry import get_method
from optimum_prune.structure import find_decoder_layers
from optimum_prune.structure.budget import plan_removals, round_kept
from optimum_prune.structure.groups import layer_groups
from optimum_prune.structure.shrink import remove_layers, shrink_group


def config(**kw):
    base = dict(pattern="structured", num_calibration_samples=8, seqlen=32, batch_size=4, channel_multiple=1)
    base.update(kw)
    return PruningConfig(**base)


def decoder_linear_params(model):
    _, layers = find_decoder_layers(model)
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))


# A fresh interpreter that cannot import optimum_prune, as on a machine without it.
BLOCK_PLUGIN = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'optimum_prune':
            raise ImportError('optimum_prune is not installed here')
sys.meta_path.insert(0, _Block())
"""

LOAD_AND_RUN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, kwargs = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
ids = torch.load(folder + '/../ids.pt')
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=6, do_sample=False)
torch.save({'logits': logits, 'generated': generated, 'class': type(model).__name__}, folder + '/../loaded.pt')
"""


def load_elsewhere(folder, kwargs, block_plugin):
    code = (BLOCK_PLUGIN if block_plugin else "") + LOAD_AND_RUN
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    script = os.path.join(os.path.dirname(folder), "load.py")
    with open(script, "w") as handle:
        handle.write(code)
    result = subprocess.run([sys.executable, script, folder, json.dumps(kwargs)], capture_output=True, text=True,
                            timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(os.path.join(os.path.dirname(folder), "loaded.pt"))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_shrinking_one_group_equals_zeroing_its_units(arch):
    """Removing units physically computes exactly what the dense layer computes with those units zeroed."""
    model = tiny_model(arch)
    dense = tiny_model(arch)
    prefix, layers = find_decoder_layers(model)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    for group in layer_groups(model, layers[0], f"{prefix}.0", 0):
        keep = torch.arange(0, group.units, 2)
        dropped = sorted(set(range(group.units)) - set(keep.tolist()))
        dense_consumer = dict(dense.named_modules())[group.consumer_name]
        with torch.no_grad():
            dense_consumer.weight[:, unit_indices(torch.tensor(dropped), group.cols_per_unit)] = 0
        weights = {p.name: p.linear.weight.detach().float() for p in group.producers}
        weights[group.consumer_name] = group.consumer.weight.detach().float()
        weights.update({p.name + ".bias": p.linear.bias.detach().float() for p in group.producers if p.linear.bias is not None})
        shrink_group(group, keep, weights)
        assert group.consumer.in_features == keep.numel() * group.cols_per_unit
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_budget_split():
    model = tiny_model("llama")  # 4 heads / 2 KV groups, intermediate 128, hidden 64
    prefix, layers = find_decoder_layers(model)
    attention, mlp = layer_groups(model, layers[0], f"{prefix}.0", 0)
    total = attention.params + mlp.params
    # attention removes floor(s * units) KV groups, the MLP makes the layer total the nearest whole channel count
    for sparsity in (0.1, 0.3, 0.5, 0.7):
        removals = plan_removals([attention, mlp], sparsity, {}, set())
        assert removals[attention.name] == int(sparsity * 2)
        removed = removals[attention.name] * attention.params_per_unit + removals[mlp.name] * mlp.params_per_unit
        assert abs(removed - sparsity * total) <= mlp.params_per_unit / 2
    assert plan_removals([attention, mlp], 0.3, {}, {attention.name})[attention.name] == 0
    fixed = plan_removals([attention, mlp], 0.3, {mlp.name: 0.25}, set())
    assert fixed[mlp.name] == 32  # the fixed group takes its own share; attention (now last free) the rest
    with pytest.raises(PruningError, match="would remove all"):
        plan_removals([attention, mlp], 0.95, {}, {attention.name})


def test_channel_multiple_rounds_mlp_widths(calib_ids):
    assert [round_kept(k, 1536, 32) for k in (1229, 922, 20, 1530)] == [1216, 928, 32, 1530]
    assert round_kept(45, 60, 32) == 45  # too few channels to round
    assert round_kept(1530, 1536, 32, allow_full=True) == 1536  # a global allocation may leave a layer whole
    model = tiny_model("llama", intermediate_size=256)
    pruner = Pruner(config(method="fasp", sparsity=0.3, channel_multiple=32))
    pruner.prune(model, calib_ids, progress=False)
    assert model.config.intermediate_size % 32 == 0 and model.config.intermediate_size < 256
    assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "fasp", "sparsefw"])
def test_structured_methods_shrink_every_architecture(arch, method, calib_ids):
    model = tiny_model(arch)
    before = decoder_linear_params(model)
    pruner = Pruner(config(method=method, sparsity=0.3))
    pruner.prune(model, calib_ids, progress=False)
    after = decoder_linear_params(model)
    assert 1 - after / before == pytest.approx(pruner.report.overall_sparsity)
    # the layer total is within one MLP channel of the goal (OPT: its MLP takes the whole budget)
    assert pruner.report.overall_sparsity == pytest.approx(0.3, abs=0.02)
    width_key = "ffn_dim" if arch == "opt" else "intermediate_size"
    _, layers = find_decoder_layers(model)
    consumer = layers[0].fc2 if arch == "opt" else layers[0].mlp.down_proj
    assert getattr(model.config, width_key) == consumer.in_features < 128
    assert getattr(model.config, "layer_widths", None) is None  # uniform: a stock config
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:40].unsqueeze(0)).logits).all()


def _output_error(problem, Z, keep, new_weight):
    cols = unit_indices(keep, problem.cols_per_unit)
    weight = problem.consumer[:, cols] if new_weight is None else new_weight
    return float(((Z @ problem.consumer.T - Z[:, cols] @ weight.T) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fasp_restoration_lowers_the_consumer_error(seed):
    problem, Z = synthetic_structured_problem(seed)
    with_restore = get_method("fasp")(get_method("fasp").parse_options({}), dampening=1e-4)
    without = get_method("fasp")(get_method("fasp").parse_options({"restore": False}))
    restored = with_restore.prune_structured(problem, 16)
    plain = without.prune_structured(problem, 16)
    assert torch.equal(restored.keep, plain.keep) and restored.keep.numel() == 32
    assert plain.consumer_weight is None
    error_restored = _output_error(problem, Z, restored.keep, restored.consumer_weight)
    error_plain = _output_error(problem, Z, plain.keep, None)
    assert error_restored < 0.7 * error_plain
    # the restoration is the least-squares optimum: no other weight on those columns does better
    cols = unit_indices(restored.keep, 1)
    exact = torch.linalg.lstsq(Z[:, cols].double(), (Z @ problem.consumer.T).double()).solution.T.float()
    assert error_restored <= _output_error(problem, Z, restored.keep, exact) * 1.001


def test_fasp_drops_a_refit_that_outgrows_the_dense_consumer():
    """The removed unit carries most of the output and is partly predictable from the kept ones (a
    unit the policy-gradient search removed while the loss did not need it): the least squares
    rebuilds it with a weight far above the dense consumer's. With ``max_restore_growth`` that re-fit
    is dropped (the kept columns stay); an ordinary re-fit stays within the limit and is kept."""
    from optimum_prune.calibration.statistics import InputStatistics
    from optimum_prune.methods.structured import StructuredProblem

    g = torch.Generator().manual_seed(0)
    tokens, n = 400, 16
    Z = torch.randn(tokens, n, generator=g)
    Z[:, 0] = 30 * (Z[:, 1:4].mean(1) + 0.3 * torch.randn(tokens, generator=g))
    stats = InputStatistics(n, {"gram"})
    stats.update(Z)
    consumer = torch.randn(8, n, generator=g)
    problem = StructuredProblem("mlp", n, [torch.randn(n, 4, generator=g)], [1], consumer, 1, consumer_stats=stats)
    keep = torch.arange(1, n)
    fasp = get_method("fasp")
    unlimited = fasp(fasp.parse_options({}), dampening=1e-4).restore(problem, keep).consumer_weight
    assert unlimited.norm() > 2 * consumer.norm()  # the kept inputs amplified
    assert _output_error(problem, Z, keep, unlimited) < _output_error(problem, Z, keep, None)  # where it was fitted
    limited = fasp(fasp.parse_options({"max_restore_growth": 1.0}), dampening=1e-4)
    declined = limited.restore(problem, keep)
    assert declined.consumer_weight is None and torch.equal(declined.keep, keep)
    assert declined.declined_growth == pytest.approx(float(unlimited.norm() / consumer.norm()), rel=1e-5)
    ordinary, _ = synthetic_structured_problem(0)
    result = limited.prune_structured(ordinary, 16)
    assert result.consumer_weight is not None and result.consumer_weight.norm() <= ordinary.consumer.norm()
    assert result.declined_growth is None
    with pytest.raises(PruningError, match="max_restore_growth"):
        fasp.parse_options({"max_restore_growth": -1})


def test_fasp_score_is_column_mass_times_input_norm():
    problem, Z = synthetic_structured_problem()
    scores = column_scores(problem, problem.consumer_stats.input_norm)
    manual = problem.consumer.abs().sum(0) * Z.norm(dim=0)
    torch.testing.assert_close(scores, manual, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep_top(scores, 10), torch.sort(torch.topk(manual, 38).indices).values)


def test_restore_columns_handles_dead_channels():
    gram = torch.zeros(6, 6)
    gram[:3, :3] = torch.eye(3)
    restored = restore_columns(torch.randn(4, 6), gram, torch.tensor([0, 1, 4]), 0.01)
    assert restored.shape == (4, 3) and torch.isfinite(restored).all()


# ------------------------------------------------------------------------------------------------
def test_uniform_head_pruning_loads_with_plain_transformers(tmp_path, calib_ids, tokenizer):
    """Every layer the same widths: a stock config that loads without optimum-prune."""
    model = tiny_model("llama")
    pruner = Pruner(config(method="fasp", sparsity=0.5))
    pruner.prune(model, calib_ids, progress=False)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    assert type(model).__name__ == "LlamaForCausalLM"
    folder = str(tmp_path / "uniform")
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    saved = json.load(open(os.path.join(folder, "config.json")))
    assert saved["model_type"] == "llama" and "auto_map" not in saved
    assert not os.path.exists(os.path.join(folder, "modeling_pruned.py"))
    ids = calib_ids[:12].unsqueeze(0)
    torch.save(ids, tmp_path / "ids.pt")
    loaded = load_elsewhere(folder, {}, block_plugin=True)
    assert loaded["class"] == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], model(ids).logits, rtol=0, atol=0)
    assert torch.equal(loaded["generated"], model.generate(ids, max_new_tokens=6, do_sample=False))


def test_head_count_the_stock_config_refuses_still_saves_and_loads(tmp_path, calib_ids, tokenizer):
    """Removing heads so that hidden_size is no longer a multiple of the head count (LLaMA-3.2-1B's
    2048 / 32 heads at 20%: 28) makes transformers' config validation refuse the stock class; the
    prune must fall back to the pruned class, not fail after all its work (found by
    benchmarks/scaling.py at hidden 2048)."""
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)  # 4 groups of 2 heads
    pruner = Pruner(config(method="fasp", sparsity=0.25))  # one group goes: 6 heads
    pruner.prune(model, calib_ids, progress=False)
    heads = model.model.layers[0].self_attn.q_proj.out_features // 8
    assert heads == 6 and 64 % heads != 0
    folder = str(tmp_path / "heads")
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    ids = calib_ids[:12].unsqueeze(0)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _heterogeneous(arch, calib_ids):
    model = tiny_model(arch, num_hidden_layers=3)
    overrides = {"*.layers.0": {"sparsity": 0.45}, "*.layers.2.mlp": {"sparsity": 0.1}}
    pruner = Pruner(config(method="fasp", sparsity=0.3, overrides=overrides))
    pruner.prune(model, calib_ids, progress=False)
    return model, pruner


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_heterogeneous_widths_save_and_load(arch, tmp_path, calib_ids, tokenizer):
    dense_size = None
    dense = tiny_model(arch, num_hidden_layers=3)
    dense.save_pretrained(tmp_path / "dense")
    dense_size = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    model, pruner = _heterogeneous(arch, calib_ids)
    widths = model.config.layer_widths
    key = "ffn_dim" if arch == "opt" else "intermediate_size"
    assert len({w.get(key) for w in widths}) == 3  # every layer its own MLP width
    assert type(model).__name__.startswith("Pruned")
    folder = str(tmp_path / "hetero")
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    saved = json.load(open(os.path.join(folder, "config.json")))
    assert saved["model_type"] == f"optimum_pruned_{arch}"
    assert saved["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.")
    assert os.path.exists(os.path.join(folder, "modeling_pruned.py"))
    removed = 1 - sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())
    size_ratio = os.path.getsize(os.path.join(folder, "model.safetensors")) / dense_size
    assert size_ratio == pytest.approx(1 - removed, abs=0.01) and size_ratio < 0.9

    ids = calib_ids[:12].unsqueeze(0)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    # without optimum-prune: the modelling file saved next to the weights, trust_remote_code
    remote = load_elsewhere(folder, {"trust_remote_code": True}, block_plugin=True)
    # with optimum-prune imported: the registered classes, no remote code
    local = AutoModelForCausalLM.from_pretrained(folder)
    assert type(local).__name__ == remote["class"] == type(model).__name__
    for result_logits in (remote["logits"], local(ids).logits.detach()):
        torch.testing.assert_close(result_logits, logits, rtol=0, atol=0)
    assert torch.equal(remote["generated"], generated)
    assert torch.equal(local.generate(ids, max_new_tokens=6, do_sample=False), generated)


def test_heterogeneous_checkpoint_needs_trust_remote_code_without_the_plugin(tmp_path, calib_ids):
    model, pruner = _heterogeneous("llama", calib_ids)
    folder = str(tmp_path / "hetero")
    pruner.save_pretrained(folder)
    code = BLOCK_PLUGIN + f"""
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({folder!r})
except Exception as err:
    print('refused:', type(err).__name__)
"""
    assert "refused" in python_stdout(code)


def test_remove_layers_keeps_generation_working(tmp_path, calib_ids):
    model = tiny_model("qwen2", num_hidden_layers=4)
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.config.layer_types) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = calib_ids[:10].unsqueeze(0)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path / "shallow")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False), generated)
    with pytest.raises(PruningError, match="keep at least one"):
        remove_layers(model, [0, 1])


def test_structured_errors_are_clear(calib_ids):
    with pytest.raises(PruningError, match="does not support pattern structured"):
        PruningConfig(method="wanda", pattern="structured")
    with pytest.raises(PruningError, match="would remove all"):
        Pruner(config(method="wanda-sp", sparsity=0.9, ignore=["*.self_attn"])).prune(tiny_model(), calib_ids, progress=False)
    with pytest.raises(PruningError, match="cannot shrink architecture"):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
        Pruner(config(method="magnitude", sparsity=0.2)).prune(gpt2, progress=False)


def test_structured_prune_with_offloaded_layers_matches_in_memory(tmp_path, calib_ids):
    from accelerate import dispatch_model

    reference = tiny_model("llama", num_hidden_layers=3)
    Pruner(config(method="fasp", sparsity=0.3)).prune(reference, calib_ids, progress=False)
    model = tiny_model("llama", num_hidden_layers=3)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu")
    Pruner(config(method="fasp", sparsity=0.3)).prune(model, calib_ids, progress=False)
    ids = calib_ids[:32].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, producers_hooked", [("fasp", False), ("spap", False), ("sparsefw", False), ("wanda-sp", True)])
def test_statistics_pass_hooks_only_what_the_method_uses(method, producers_hooked):
    from optimum_prune.engine.layerwise import LayerwiseEngine
    from optimum_prune.registry import get_method

    model = tiny_model("llama")
    cfg = config(method=method, sparsity=0.6)
    engine = LayerwiseEngine(model, cfg, get_method(method)(cfg.method_options), progress=False)
    hooked = engine.hooked_linears(engine.plan[0])
    consumers = {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    assert consumers <= set(hooked)
    assert (len(hooked) > len(consumers)) == producers_hooked


def test_engine_takes_given_widths_and_units(calib_ids):
    """The layer-wise engine shrinks to widths (``removals``) or units (``kept_units``) decided by
    the caller — how a global method hands its allocation to a layer-wise solver."""
    from optimum_prune.engine.layerwise import LayerwiseEngine
    from optimum_prune.registry import get_method

    cfg = PruningConfig(method="fasp", pattern="structured", sparsity=0.3, num_calibration_samples=8, seqlen=32,
                        channel_multiple=1)
    windows = calib_ids[: 8 * 32].view(8, 32)
    model = tiny_model("llama", num_hidden_layers=2)
    dense_gate = [layer.mlp.gate_proj.weight.clone() for layer in model.model.layers]
    keep = torch.tensor([0, 5, 17, 90, 127])
    kept = {"model.layers.0.mlp": keep}
    engine = LayerwiseEngine(model, cfg, get_method("fasp")(), progress=False, kept_units=kept,
                             removals={"model.layers.1.mlp": 100})
    report = engine.run(windows)
    layers = model.model.layers
    assert torch.equal(layers[0].mlp.gate_proj.weight, dense_gate[0][keep])  # exactly the given units
    assert layers[1].mlp.down_proj.in_features == 128 - 100
    assert layers[0].self_attn.o_proj.in_features == 64  # groups not named keep every unit
    assert report.sparsity["model.layers.1.mlp"] == pytest.approx(100 / 128)
    with pytest.raises(PruningError, match="removals"):
        LayerwiseEngine(tiny_model("llama"), cfg, get_method("fasp")(), removals={"model.layers.0.mlp": 128})
