"""Plan-only runs (`Pruner.plan`, ``--dry-run``): the plan counts what a prune would do, the
estimates are there, no weight is touched or read and nothing is written; the engine's phase
timings that the cost model is compared with are recorded."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine.cost import estimate_phases
from optimum_prune.engine.layerwise import LayerwiseEngine
from optimum_prune.commands.prune import main


def versions(model):
    return {name: (p._version, p.data_ptr()) for name, p in model.named_parameters()}


def test_plan_counts_and_touches_no_weight():
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    seen = versions(model)
    plan = Pruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=8, seqlen=32)).plan(model)
    assert plan.tasks["Linears"] == 14 and plan.targets == {"50%": 14} and plan.layers == 2
    assert plan.tokens == 256 and plan.seconds > 0 and plan.rate > 0
    assert set(plan.peak_bytes) == {"cpu"} and plan.peak_bytes["cpu"] > plan.working.total("cpu") > 0
    assert set(plan.working.parts["cpu"]) >= {"activations", "statistics", "forward", "solver"}
    assert versions(model) == seen  # no parameter was written, in place or replaced
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    text = plan.describe()
    assert "14 Linears" in text and "peak memory on cpu" in text and "time: about" in text


def test_plan_of_structured_and_nm_prunes():
    model = tiny_model("llama")
    structured = Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=0.2, channel_multiple=1,
                                      num_calibration_samples=8, seqlen=32)).plan(model)
    assert structured.tasks["channel groups"] == 4 and structured.tasks["Linears"] == 0
    assert any(key.startswith("remove ") and key.endswith(" units") and key != "remove 0 units"
               for key in structured.targets)
    nm = Pruner(PruningConfig(method="wanda", pattern="2:4", num_calibration_samples=8, seqlen=32)).plan(model)
    assert nm.targets == {"2:4": 14}


def test_solve_cost_follows_the_methods():
    """ALPS's ADMM iterations cost more than SparseGPT's one factorisation and sweep, which cost more
    than a selection; magnitude needs no pass."""
    from optimum_prune import get_method

    model = tiny_model("llama")

    def phases(method, **kw):
        config = PruningConfig(method=method, sparsity=0.5, num_calibration_samples=8, seqlen=32, **kw)
        engine = LayerwiseEngine(model, config, Pruner(config).method, progress=False)
        return estimate_phases(engine, 8, 32)

    sparsegpt, alps, magnitude = phases("sparsegpt"), phases("alps"), phases("magnitude")
    assert alps["solve"] > sparsegpt["solve"] > magnitude["solve"] > 0

    def solve(method):  # at a real layer's shape, where the counts were fitted
        return get_method(method)().solve_flops(2048, 2048)

    assert solve("alps") > 10 * solve("sparsegpt") and solve("sparsegpt") > solve("magnitude")
    assert solve("fista") > solve("sparsegpt") and solve("sparsefw") > solve("wanda")
    assert magnitude["statistics"] == magnitude["forward"] == 0 and magnitude["solve"] > 0
    assert sparsegpt["statistics"] > sparsegpt["forward"] > 0  # the Gram products on top of the forward
    owl = phases("wanda", sparsity_profile="owl")
    assert owl["profile"] == pytest.approx(phases("wanda")["forward"])  # one dense pass


def test_prune_records_phase_seconds():
    pruner = Pruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=8, seqlen=32))
    pruner.prune(tiny_model("llama"), torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)),
                 progress=False)
    phases = pruner.report.phase_seconds
    assert set(phases) == {"statistics", "solve", "forward"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= pruner.report.seconds


def test_cli_dry_run_reads_only_the_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    for name in os.listdir(folder):  # the weights are never read: garbage in their place changes nothing
        if name.endswith(".safetensors"):
            (folder / name).write_bytes(b"not a safetensors file")
    files = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["--model", str(folder), "--method", "alps", "--sparsity", "0.6", "--dataset", "packaged:wiki-leads",
                 "--num-samples", "16", "--seqlen", "64", "--output", str(tmp_path / "out"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "14 Linears" in captured.out and "target 60%: 14" in captured.out
    assert "peak memory on cpu" in captured.out and "1,024 calibration tokens" in captured.out
    assert not (tmp_path / "out").exists() and os.listdir(work) == []
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == files
    assert main(["--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--dataset", "packaged:wiki-leads",
                 "--seqlen", "64", "--dry-run"]) == 0  # no --output needed
    # and it refuses what the real run refuses: the default 512 tokens exceed this model's 256 positions
    assert main(["--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--dataset", "packaged:wiki-leads",
                 "--dry-run"]) == 2


def test_cli_dry_run_under_several_processes_prints_the_solve_share_once(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    args = ["--model", str(folder), "--method", "fista", "--sparsity", "0.6", "--dataset", "packaged:wiki-leads",
            "--num-samples", "16", "--seqlen", "64", "--dry-run"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate launch set for each process
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    shared = capsys.readouterr().out
    assert "processes" not in alone and "2 processes: each calibrates on 1/2 of the windows" in shared
    share = float(shared.split("busiest process solving ")[1].split("%")[0]) / 100
    assert 0.5 <= share < 0.6  # FISTA's stages are cut into row blocks: close to half each
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0 and capsys.readouterr().out == ""  # the other processes plan, rank 0 prints


def test_cli_without_output_names_the_fix(tmp_path, capsys):
    code = main(["--model", str(tmp_path), "--method", "magnitude", "--sparsity", "0.5"])
    assert code == 2
    assert "--output FOLDER is required" in capsys.readouterr().err


def test_the_sensitivity_profile_adds_its_passes_to_the_peak():
    model = tiny_model("llama", vocab_size=4096)

    def plan(**kw):
        return Pruner(PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=8, seqlen=32, **kw)).plan(model)

    uniform, sensitivity = plan(), plan(sparsity_profile="sensitivity")
    assert uniform.profile["cpu"] == 0 and sensitivity.profile["cpu"] > 0
    # the head's logits of one batch of the sensitivity windows, three copies, at least
    assert sensitivity.profile["cpu"] >= 3 * 4 * 2 * 32 * 4096
    # the peak is what is held plus the larger of the prune's working set and the profile's passes
    # (compared within one plan: the process's own memory drifts between two plans)
    assert sensitivity.profile["cpu"] > sensitivity.working.total("cpu")
    assert sensitivity.peak_bytes["cpu"] == sensitivity.resident["cpu"] + sensitivity.profile["cpu"]
    assert "sparsity profile's passes" in sensitivity.describe()


def test_stacking_solvers_are_sized_for_the_stacked_problems():
    """Gram solvers solve q/k/v and gate/up as one tall matrix; their working copies are counted for
    those stacks (an upper bound: o_proj counts with q/k/v), per-Linear methods per Linear."""
    from optimum_prune import get_method
    from optimum_prune.engine.tasks import LinearTask

    model = tiny_model("llama")
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    for name, stacked in (("alps", True), ("wanda", False)):
        config = PruningConfig(method=name, sparsity=0.5, num_calibration_samples=8, seqlen=32)
        engine = LayerwiseEngine(model, config, get_method(name)(), progress=False)
        shapes = sorted(LinearTask.solve_shapes(list(engine.plan[0]), engine.method))
        if stacked:
            assert shapes == sorted([(2 * hidden + 2 * kv, hidden), (2 * inter, hidden), (hidden, inter)])
        else:
            assert len(shapes) == 7 and (2 * inter, hidden) not in shapes


def test_checkpointed_prunes_count_the_layer_held_until_its_commit():
    from optimum_prune import get_method
    from optimum_prune.engine.resources import estimate_memory

    model = tiny_model("llama")
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=8, seqlen=32)
    engine = LayerwiseEngine(model, config, get_method("wanda")(), progress=False)
    plain = estimate_memory(engine, 8, 32, torch.device("cpu"))
    held = estimate_memory(engine, 8, 32, torch.device("cpu"), checkpoint=True)
    layer = sum(t.linear.weight.numel() * 4 for t in engine.plan[0])
    assert "checkpoint" not in plain.parts["cpu"] and held.parts["cpu"]["checkpoint"] == layer
    assert held.total("cpu") == plain.total("cpu") + layer
