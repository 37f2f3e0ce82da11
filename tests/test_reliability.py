"""Reliability: checkpoint/resume (in process and after SIGKILL), atomic output, determinism,
singular statistics, tampered inputs and the resource guard."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SLOW_CLI, make_texts, make_tokenizer, prune_interrupted, tiny_model
from safetensors.torch import load_file

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import resources
from optimum_prune.engine.checkpoint import STATE_NAME
from optimum_prune.calibration.statistics import InputStatistics
from optimum_prune.errors import PruningError
from optimum_prune.patterns import Target
from optimum_prune.pruner import load_model, save_pruned
from optimum_prune.registry import get_method


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
LAYERS = 4


def config(method="sparsegpt", pattern="unstructured", **kw):
    sparsity = None if ":" in pattern else 0.4
    return PruningConfig(method=method, pattern=pattern, sparsity=sparsity, num_calibration_samples=8, seqlen=32,
                         channel_multiple=1, **kw)


def fresh():
    return tiny_model("llama", num_hidden_layers=LAYERS)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    assert not different, different


def interrupted(cfg, checkpoint_dir, calib_ids, at_layer=2, model=None):
    """Prune with checkpoints and raise KeyboardInterrupt when layer ``at_layer`` starts."""
    prune_interrupted(cfg, model or fresh(), calib_ids, at_layer, checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize(
    "method, pattern, kwargs",
    [
        ("sparsegpt", "unstructured", {}),
        ("fista", "2:4", {"iterations": 4, "rounds": 1}),  # error correction: the staged engine path
        ("fasp", "structured", {}),
        ("magnitude", "unstructured", {}),
    ],
)
def test_resume_after_interrupt_gives_identical_weights(tmp_path, calib_ids, method, pattern, kwargs):
    cfg = config(method, pattern, method_kwargs=kwargs)
    reference, reference_pruner = fresh(), Pruner(cfg)
    reference_pruner.prune(reference, calib_ids, progress=False)

    interrupted(cfg, tmp_path / "ckpt", calib_ids)
    state = json.loads((tmp_path / "ckpt" / STATE_NAME).read_text())
    assert state["next_layer"] == 2 and len(state["layers"]) == 2

    resumed = fresh()
    pruner = Pruner(cfg)
    pruner.prune(resumed, calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert_same_weights(reference, resumed)
    assert pruner.report.to_dict() == reference_pruner.report.to_dict()
    pruner.checkpoint.clear()
    assert not (tmp_path / "ckpt").exists()


def test_resume_of_an_offloaded_model(tmp_path, calib_ids):
    from accelerate import dispatch_model

    cfg = config()
    reference = fresh()
    Pruner(cfg).prune(reference, calib_ids, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(LAYERS)}}

    def offloaded(name):
        return dispatch_model(fresh(), device_map=device_map, offload_dir=str(tmp_path / name), main_device="cpu")

    interrupted(cfg, tmp_path / "ckpt", calib_ids, model=offloaded("a"))
    model = offloaded("b")
    Pruner(cfg).prune(model, calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    ids = calib_ids[:32].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_checkpoint_refuses_another_prune(tmp_path, calib_ids):
    interrupted(config(), tmp_path / "ckpt", calib_ids)
    with pytest.raises(PruningError, match="pass resume"):
        Pruner(config()).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(PruningError, match="different pruning config"):
        Pruner(config(dampening=0.1)).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(PruningError, match="different model"):
        other = tiny_model("llama", seed=1, num_hidden_layers=LAYERS)
        Pruner(config()).prune(other, calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(PruningError, match="different calibration data"):
        Pruner(config()).prune(fresh(), calib_ids.flip(0), progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(PruningError, match="needs checkpoint_dir"):
        Pruner(config()).prune(fresh(), calib_ids, progress=False, resume=True)
    (tmp_path / "ckpt" / STATE_NAME).write_text("{not json")
    with pytest.raises(PruningError, match="unreadable"):
        Pruner(config()).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)


def _resumed_without(tmp_path, calib_ids, cfg, module, name):
    """Resume the prune in ``tmp_path / "ckpt"`` with ``module.name`` raising: the search or
    measurement it replaces must not run again."""
    def searched(*args, **kwargs):
        raise AssertionError(f"{name} ran again on resume")

    resumed, pruner = fresh(), Pruner(cfg)
    original = getattr(module, name)
    setattr(module, name, searched)
    try:
        pruner.prune(resumed, calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    finally:
        setattr(module, name, original)
    return resumed, pruner


@pytest.mark.parametrize("kwargs", [{"steps": 4, "samples": 2},  # the layer-wise finish, interrupted at layer 2
                                    {"steps": 4, "samples": 2, "blocks": "block"}])  # blocks gated beside channels
def test_policy_gradient_resumes_its_decision_and_its_finish(tmp_path, calib_ids, kwargs):
    from optimum_prune.engine.global_search import GlobalStructuredEngine

    cfg = config("policy_gradient", "structured", method_kwargs=kwargs)
    reference, reference_pruner = fresh(), Pruner(cfg)
    reference_pruner.prune(reference, calib_ids, progress=False)
    at_layer = 1 if kwargs.get("blocks") else 2  # the finish may run on fewer layers
    interrupted(cfg, tmp_path / "ckpt", calib_ids, at_layer=at_layer)
    state = json.loads((tmp_path / "ckpt" / STATE_NAME).read_text())
    assert state["decision"] == "decision.safetensors"
    finish = json.loads((tmp_path / "ckpt" / "finish" / STATE_NAME).read_text())
    assert finish["next_layer"] == at_layer
    with pytest.raises(PruningError, match="the whole-model decision made"):  # not silently started over
        Pruner(cfg).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt")

    resumed, pruner = _resumed_without(tmp_path, calib_ids, cfg, GlobalStructuredEngine, "_search")
    assert_same_weights(reference, resumed)
    assert {k: v for k, v in pruner.report.to_dict().items() if k != "seconds"} == \
        {k: v for k, v in reference_pruner.report.to_dict().items() if k != "seconds"}
    pruner.checkpoint.clear()
    assert not (tmp_path / "ckpt").exists()


def test_policy_gradient_without_finish_resumes_from_its_decision(tmp_path, calib_ids, monkeypatch):
    """One-pass restoration (no layer-wise finish): a kill while the groups are restored; the resume
    collects the dense statistics again and restores from the saved decision."""
    from optimum_prune.engine import global_search
    from optimum_prune.engine.global_search import GlobalStructuredEngine

    cfg = config("policy_gradient", "structured", method_kwargs={"steps": 4, "samples": 2, "sequential": False,
                                                                  "blocks": "layer"})
    reference = fresh()
    Pruner(cfg).prune(reference, calib_ids, progress=False)
    original, calls = global_search.apply_to_group, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(global_search, "apply_to_group", stop)
    with pytest.raises(KeyboardInterrupt):
        Pruner(cfg).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(global_search, "apply_to_group", original)
    resumed, pruner = _resumed_without(tmp_path, calib_ids, cfg, GlobalStructuredEngine, "_search")
    assert_same_weights(reference, resumed)
    pruner.checkpoint.clear()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("blocks", ["none", "layer"])
def test_policy_gradient_search_resumes_from_its_last_saved_step(tmp_path, calib_ids, monkeypatch, blocks):
    """A kill in the middle of the search: the resume starts from the saved step (its probabilities,
    sampler, baseline, history and place in the batches), measures no start again, and ends with
    the weights, report and loss history of an uninterrupted run."""
    from optimum_prune.engine import checkpoint as checkpoint_module
    from optimum_prune.methods.policy_gradient import PolicyGradient

    cfg = config("policy_gradient", "structured", method_kwargs={
        "steps": 25, "samples": 2, "init_scope": "sensitivity", "blocks": blocks, "sensitivity_rounds": 1})
    reference, reference_pruner = fresh(), Pruner(cfg)
    reference_pruner.prune(reference, calib_ids, progress=False)
    original, saved = checkpoint_module.LayerCheckpoint.commit_search, []

    def killed_after_two(self, tensors, notes, seconds):
        original(self, tensors, notes, seconds)
        saved.append(notes["step"])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.LayerCheckpoint, "commit_search", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        Pruner(cfg).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.undo()
    assert saved == [0, 10]
    state = json.loads((tmp_path / "ckpt" / STATE_NAME).read_text())
    assert state["search_notes"]["step"] == 10 and len(state["search_notes"]["history"]) == 10
    resumed, pruner = _resumed_without(tmp_path, calib_ids, cfg, PolicyGradient, "_initial_probabilities")
    assert_same_weights(reference, resumed)
    assert pruner.engine.history == reference_pruner.engine.history
    assert {k: v for k, v in pruner.report.to_dict().items() if k != "seconds"} == \
        {k: v for k, v in reference_pruner.report.to_dict().items() if k != "seconds"}
    pruner.checkpoint.clear()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("kwargs", [{}, {"granularity": "block", "score": "loss"}])
def test_depth_prune_resumes_from_its_decision(tmp_path, calib_ids, monkeypatch, kwargs):
    from optimum_prune.engine import depth
    from optimum_prune.engine.depth import DepthEngine

    cfg = config("block-influence", "structured", method_kwargs=kwargs)
    reference, reference_pruner = fresh(), Pruner(cfg)
    reference_pruner.prune(reference, calib_ids, progress=False)
    removal = "remove_blocks" if kwargs else "remove_layers"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(depth, removal, killed)
    with pytest.raises(KeyboardInterrupt):
        Pruner(cfg).prune(fresh(), calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.undo()
    resumed, pruner = _resumed_without(tmp_path, calib_ids, cfg, DepthEngine, "_choose")
    assert_same_weights(reference, resumed)
    assert resumed.config.to_dict() == reference.config.to_dict()
    assert {k: v for k, v in pruner.report.to_dict().items() if k != "seconds"} == \
        {k: v for k, v in reference_pruner.report.to_dict().items() if k != "seconds"}
    pruner.checkpoint.clear()
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# the CLI killed with SIGKILL half-way, then resumed
@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model_dir = root / "tiny-llama"
    tiny_model("llama", num_hidden_layers=LAYERS).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "calib.txt").write_text("\n\n".join(make_texts(40)))
    return root


def _cli_args(assets, output, *extra):
    return ["--model", str(assets / "tiny-llama"), "--method", "sparsegpt", "--sparsity", "0.5",
            "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32", "--no-progress",
            "--output", str(output), *extra]


def test_sigkill_then_resume_matches_uninterrupted_run(cli_assets):
    root = cli_assets
    ckpt, out = root / "ckpt", root / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *_cli_args(root, out, "--checkpoint-dir", str(ckpt))],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state = ckpt / STATE_NAME
            if state.is_file() and json.loads(state.read_text())["next_layer"] >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    done = json.loads((ckpt / STATE_NAME).read_text())["next_layer"]
    assert 2 <= done < LAYERS
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".out.tmp-")]

    again = subprocess.run([sys.executable, "-m", "optimum_prune.commands", *_cli_args(root, out, "--checkpoint-dir", str(ckpt))],
                           env=ENV, capture_output=True, text=True, timeout=180)
    assert again.returncode == 2 and "--resume" in again.stderr and not out.exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "optimum_prune.commands", *_cli_args(root, out, "--checkpoint-dir", str(ckpt), "--resume")],
        env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not ckpt.exists()  # deleted once the output is saved
    clean = subprocess.run([sys.executable, "-m", "optimum_prune.commands", *_cli_args(root, root / "clean")],
                           env=ENV, capture_output=True, text=True, timeout=180)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a, b = load_file(out / "model.safetensors"), load_file(root / "clean" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
def test_stray_temporary_folders_are_removed_by_the_next_save(tmp_path):
    """The staging folder of a save killed half-way (noted in the lock file the killed run left)
    is removed by the next save; a folder merely named like one is not ours and stays."""
    from optimum_prune.locks import describe_process

    stray, lookalike = tmp_path / ".out.tmp-abc123", tmp_path / ".out.tmp-user01"
    for folder in (stray, lookalike):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text(json.dumps({**describe_process(), "made": [str(stray)]}))
    save_pruned(tiny_model("llama"), tmp_path / "out", PruningConfig(method="magnitude"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-user01", "out"]


@pytest.mark.parametrize(
    "method, pattern",
    [("sparsegpt", "unstructured"), ("alps", "unstructured"), ("fista", "2:4"), ("sparsefw", "unstructured"),
     ("wanda", "2:4"), ("fasp", "structured"), ("spap", "structured"), ("policy_gradient", "structured")],
)
def test_same_seed_same_weights(method, pattern, calib_ids):
    options = {"fista": {"iterations": 4, "rounds": 1}, "alps": {"max_iter": 20}, "sparsefw": {"iterations": 10},
               "policy_gradient": {"steps": 4, "samples": 2}}.get(method, {})
    cfg = config(method, pattern, method_kwargs=options)
    a, b = fresh(), fresh()
    Pruner(cfg).prune(a, calib_ids, progress=False)
    Pruner(cfg).prune(b, calib_ids, progress=False)
    assert_same_weights(a, b)


GRAM_METHODS = ["sparsegpt", "alps", "fista", "sparsefw"]


@pytest.mark.parametrize("method", GRAM_METHODS)
@pytest.mark.parametrize("case", ["dead inputs", "rank deficient, no damping"])
def test_degenerate_gram_matrices_give_finite_weights(method, case, caplog):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    if case == "dead inputs":  # a quarter of the input channels never fire
        X = torch.randn(200, 32, generator=g)
        X[:, ::4] = 0
        dampening = 0.01
    else:  # 5 tokens for 32 inputs: H has rank 5
        X = torch.randn(5, 32, generator=g)
        dampening = 0.0
    stats = InputStatistics(32, get_method(method).statistics | {"sq_norm"})
    stats.update(X)
    options = {"alps": {"max_iter": 20}, "fista": {"iterations": 5, "rounds": 1}}.get(method, {})
    solver = get_method(method)(get_method(method).parse_options(options), dampening=dampening)
    with caplog.at_level(logging.WARNING):
        (result,) = solver.prune_linears([W], stats, Target(0.5, PruningConfig().parsed_pattern))
    assert torch.isfinite(result.weight).all()
    assert result.mask.float().mean() == pytest.approx(0.5, abs=0.02)
    if case == "dead inputs":
        assert (result.weight[:, ::4] == 0).all()
    elif method in ("sparsegpt", "fista"):  # they factorise H: escalating damping, with a warning
        assert "not positive definite; added" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_to_finite_weights(dtype, calib_ids):
    model = fresh().to(dtype)
    Pruner(config()).prune(model, calib_ids, progress=False)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == dtype


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (lambda d: (d / "config.json").write_text("{broken"), "Could not load model"),
        (lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96')), "Could not load model"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
         "Could not load model"),
        (lambda d: (d / "config.json").unlink(), "Could not load model"),
    ],
)
def test_tampered_model_folder_is_a_clean_error(tmp_path, tamper, fragment):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tamper(folder)
    with pytest.raises(PruningError, match=fragment):
        load_model(folder)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(PruningError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_resource_guard_fails_early_with_the_numbers(monkeypatch, calib_ids):
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1024**2)
    with pytest.raises(PruningError, match=r"needs about .* on cpu \(activations .*solver.*\) but only 1.00 MiB is free"):
        Pruner(config("alps")).prune(model, calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    Pruner(config()).prune(model, calib_ids, progress=False, check_memory=False)


@pytest.mark.parametrize("method, options", [("policy_gradient", {"steps": 2}),
                                             ("policy_gradient", {"steps": 2, "blocks": "layer"}),
                                             ("block-influence", {})])
def test_whole_model_methods_refuse_before_their_passes_what_will_not_fit(method, options, monkeypatch, calib_ids):
    """The global search and the depth engine check their whole-model passes (and the search its
    layer-wise finish) against the free memory before any pass: one line with the numbers, nothing
    changed; without the check the same prune runs."""
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruningConfig(method=method, pattern="structured", sparsity=0.3, num_calibration_samples=8, seqlen=32,
                        method_kwargs=options)
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1024**2)
    with pytest.raises(PruningError, match=r"needs about .* on cpu \(.*forward .*\) but only 1.00 MiB is free; use "
                                           r".*batch_size"):
        Pruner(cfg).prune(model, calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    Pruner(cfg).prune(model, calib_ids, progress=False, check_memory=False)
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for v in before.values())


def test_memory_estimate_tracks_the_work(calib_ids):
    from optimum_prune.engine.layerwise import LayerwiseEngine

    def estimate(cfg, samples):
        engine = LayerwiseEngine(fresh(), cfg, Pruner(cfg).method)
        return resources.estimate_memory(engine, samples, cfg.seqlen, torch.device("cpu")).parts["cpu"]

    small, large = estimate(config(), 8), estimate(config(), 64)
    hidden = 64
    assert small["activations"] == 2 * 8 * 32 * hidden * 4 and large["activations"] == 8 * small["activations"]
    # one Gram matrix (and norm vector) per Linear: q, k, v, o, gate, up read 64 features, down 128
    assert small["statistics"] == 4 * (64 * 64 * 6 + 128 * 128) + 4 * (64 * 6 + 128)
    assert estimate(config("wanda"), 8)["statistics"] < small["statistics"]
    assert estimate(config("alps"), 8)["solver"] > small["solver"]
