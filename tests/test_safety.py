"""Safety of the user's files (issue #21): outputs, checkpoints, locks and early one-line errors.

Each test is named after the fault it guards against. Most CLI runs are in process
(`optimum_prune.commands.prune.main`, the code path of ``optimum-cli prune``); the runs that need a
second process (concurrency, SIGKILL) are subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from conftest import SLOW_CLI, make_texts, make_tokenizer, tiny_model

from optimum_prune import Pruner, PruningConfig, save_pruned
from optimum_prune import output as output_module
from optimum_prune.engine import activations as activations_module
from optimum_prune.engine.activations import ActivationStore
from optimum_prune.engine.checkpoint import STATE_NAME, LayerCheckpoint
from optimum_prune.commands.prune import main
from optimum_prune.errors import PruningError
from optimum_prune.output import OutputFolder
from optimum_prune.registry import get_method


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
LAYERS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tiny_model("llama", num_hidden_layers=LAYERS).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n\n".join(make_texts(40)))
    return root


def args_for(assets, output, *extra, method="sparsegpt"):
    return ["--model", str(assets / "model"), "--method", method, "--sparsity", "0.5", "--dataset",
            str(assets / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress", "--output", str(output),
            *extra]


@pytest.fixture(autouse=True)
def quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def run_cli(argv, capsys):
    capsys.readouterr()  # what the test printed before
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model (a check came too late)."""
    import optimum_prune.pruner

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad path was refused")

    monkeypatch.setattr(optimum_prune.pruner, "load_model", refuse)


def one_line_exit_2(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# ------------------------------------------------------------------------------ 1. --overwrite
def test_1_overwrite_never_replaces_the_working_directory_or_the_model(tmp_path, assets, capsys, monkeypatch,
                                                                       no_model_load):
    work = tmp_path / "work"
    shutil.copytree(assets, work)
    before = snapshot(work)
    monkeypatch.chdir(work)
    code, err = run_cli(args_for(work, ".", "--overwrite"), capsys)
    one_line_exit_2(code, err, "is the working directory")
    code, err = run_cli(args_for(work, work / "model", "--overwrite"), capsys)
    one_line_exit_2(code, err, "is the model")
    code, err = run_cli(args_for(work, work / "elsewhere", "--overwrite", "--checkpoint-dir", work / "elsewhere" / "ck"),
                        capsys)
    one_line_exit_2(code, err, "--output contains --checkpoint-dir")
    code, err = run_cli(args_for(work, tmp_path, "--overwrite"), capsys)  # an ancestor of the model and the data
    one_line_exit_2(code, err, "contains")
    assert snapshot(work) == before


def test_1_overwrite_of_the_filesystem_root_deletes_nothing(assets, capsys, monkeypatch, no_model_load):
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: deleted.append(path))
    monkeypatch.setattr(output_module, "remove_tree", lambda path: deleted.append(path))
    code, err = run_cli(args_for(assets, "/", "--overwrite"), capsys)
    one_line_exit_2(code, err, "filesystem root")
    assert deleted == []


def test_1_overwrite_replaces_only_a_previous_output(tmp_path, assets, capsys, no_model_load):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = run_cli(args_for(assets, mine, "--overwrite"), capsys)
    one_line_exit_2(code, err, "not an optimum-prune output")
    assert (mine / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------ 2. and 5. concurrent runs
def test_2_and_5_a_second_run_on_the_same_output_or_checkpoint_is_refused(tmp_path, assets, capsys):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args_for(assets, out, "--checkpoint-dir", ckpt)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (ckpt / STATE_NAME).is_file():  # the first layer is committed
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        code, err = run_cli(args_for(assets, out), capsys)  # same output
        one_line_exit_2(code, err, "is in use by process", str(first.pid))
        code, err = run_cli(args_for(assets, tmp_path / "other", "--checkpoint-dir", ckpt, "--resume"), capsys)
        one_line_exit_2(code, err, "Checkpoint folder", "in use by process", str(first.pid))
        _, stderr = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-2000:]
    assert {"config.json", "model.safetensors", "pruning_config.json"} <= {p.name for p in out.iterdir()}
    assert not ckpt.exists() and not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or temporary folder left


def test_5_the_lock_of_a_killed_run_does_not_block(tmp_path):
    ckpt = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom optimum_prune.engine.checkpoint import LayerCheckpoint\n"
        f"LayerCheckpoint({str(ckpt)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PruningError, match=f"in use by process {holder.pid}"):
            LayerCheckpoint(ckpt).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    checkpoint = LayerCheckpoint(ckpt)
    checkpoint.acquire()  # the lock file is still there, but nobody holds it
    checkpoint.release()
    assert not ckpt.exists()


# ------------------------------------------------------------------------------ 3. and 4. checkpoint files
def interrupted_checkpoint(folder, calib_ids):
    from conftest import prune_interrupted

    cfg = PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=4, seqlen=32)
    prune_interrupted(cfg, tiny_model("llama", num_hidden_layers=LAYERS), calib_ids, 2, checkpoint_dir=folder)
    return cfg


def test_3_checkpoint_names_outside_the_folder_are_refused(tmp_path, calib_ids):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cfg = interrupted_checkpoint(tmp_path / "ckpt", calib_ids)
    state_path = tmp_path / "ckpt" / STATE_NAME
    state = json.loads(state_path.read_text())
    for field, value in (("inputs", str(victim)), ("layers", ["../victim.txt", *state["layers"][1:]])):
        state_path.write_text(json.dumps({**state, field: value}))
        for resume in (True, False):
            with pytest.raises(PruningError, match="corrupt"):
                Pruner(cfg).prune(tiny_model("llama", num_hidden_layers=LAYERS), calib_ids, progress=False,
                                  checkpoint_dir=tmp_path / "ckpt", resume=resume)
        with pytest.raises(PruningError, match="corrupt"):
            LayerCheckpoint(tmp_path / "ckpt").clear()
    assert victim.read_text() == "precious"


def test_4_clearing_a_checkpoint_removes_only_its_own_files(tmp_path, calib_ids):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "layer-notes.txt").write_text("mine")
    (ckpt / "inputs-2024.csv").write_text("mine too")
    cfg = PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=4, seqlen=32)
    pruner = Pruner(cfg)
    pruner.prune(tiny_model("llama", num_hidden_layers=LAYERS), calib_ids, progress=False, checkpoint_dir=ckpt)
    assert len(list(ckpt.glob("layer-0*.safetensors"))) == LAYERS
    pruner.checkpoint.clear()
    assert sorted(p.name for p in ckpt.iterdir()) == ["inputs-2024.csv", "layer-notes.txt"]


# ------------------------------------------------------------------------------ 6. preflight
def test_6_output_problems_are_refused_before_the_model_is_loaded(tmp_path, assets, capsys, monkeypatch, no_model_load):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    real_access = os.access  # root writes into a 0555 folder: pretend to be an ordinary user there
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(str(readonly)) and mode & os.W_OK
                        else real_access(p, mode, **k))
    try:
        code, err = run_cli(args_for(assets, readonly / "out"), capsys)
        one_line_exit_2(code, err, "read-only")
        code, err = run_cli(args_for(assets, tmp_path / "out", "--checkpoint-dir", readonly / "ckpt"), capsys)
        one_line_exit_2(code, err, "--checkpoint-dir", "read-only")
    finally:
        readonly.chmod(0o755)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, err = run_cli(args_for(assets, tmp_path / "link"), capsys)
    one_line_exit_2(code, err, "symbolic link")
    code, err = run_cli(args_for(assets, tmp_path / "same", "--checkpoint-dir", tmp_path / "same"), capsys)
    one_line_exit_2(code, err, "--output is --checkpoint-dir")
    code, err = run_cli(args_for(assets, tmp_path / "o", "--activations", "disk", "--activation-folder",
                                 tmp_path / "o" / "acts"), capsys)
    one_line_exit_2(code, err, "--output contains --activation-folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "readonly", "real"]


# ------------------------------------------------------------------------------ 7. permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_7_the_output_folder_gets_the_umask_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_pruned(tiny_model("llama"), tmp_path / "out", PruningConfig(method="magnitude"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "config.json").stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------ 8. atomic overwrite
def two_outputs(tmp_path):
    old, new = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    save_pruned(old, tmp_path / "out", PruningConfig(method="magnitude"))
    return snapshot(tmp_path / "out"), new


def test_8_a_kill_during_the_swap_leaves_the_old_or_the_new_output(tmp_path, monkeypatch):
    old_files, new = two_outputs(tmp_path)
    real_remove = output_module.remove_tree

    def killed_before_cleanup(path):  # the new output is in place; the old one is still being removed
        raise KeyboardInterrupt

    monkeypatch.setattr(output_module, "remove_tree", killed_before_cleanup)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(new, tmp_path / "out", PruningConfig(method="magnitude"), overwrite=True)
    new_files = snapshot(tmp_path / "out")
    assert new_files != old_files and "model.safetensors" in new_files
    monkeypatch.setattr(output_module, "remove_tree", real_remove)
    OutputFolder(tmp_path / "out", overwrite=True).reserve().release()  # the next run clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and snapshot(tmp_path / "out") == new_files


def test_8_without_an_atomic_exchange_the_old_output_survives_a_kill(tmp_path, monkeypatch):
    old_files, new = two_outputs(tmp_path)
    monkeypatch.setattr(output_module, "exchange_paths", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # killed between moving the old output aside and renaming the new one in
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(new, tmp_path / "out", PruningConfig(method="magnitude"), overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "out").exists()
    OutputFolder(tmp_path / "out").reserve().release()  # the next run puts the old output back
    assert snapshot(tmp_path / "out") == old_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_8_overwrite_uses_the_atomic_exchange_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert output_module.exchange_paths(str(a), str(b))
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ------------------------------------------------------------------------------ 9. one line, exit 2
def test_9_nan_weights_are_named_without_the_dampening_hint(tmp_path, assets, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    argv = args_for(assets, tmp_path / "out", method="magnitude")
    argv[argv.index("--model") + 1] = str(tmp_path / "nan-model")
    code, err = run_cli(argv, capsys)
    one_line_exit_2(code, err, "model.layers.1.mlp.up_proj", "NaN")
    assert "dampening" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["opt", "llama", "qwen2"])
def test_9_seqlen_above_the_positions_is_refused(arch, tmp_path, capsys):
    model = tiny_model(arch, max_position_embeddings=64)
    with pytest.raises(PruningError, match="longer than this model's 64 positions"):
        Pruner(PruningConfig(method="wanda", sparsity=0.5, seqlen=80, num_calibration_samples=2)).prune(
            model, torch.randint(0, 200, (1000,)), progress=False)
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(10)))
    code, err = run_cli(["--model", tmp_path / "model", "--method", "wanda", "--dataset", tmp_path / "calib.txt",
                         "--seqlen", "80", "--num-samples", "2", "--no-progress", "--output", tmp_path / "out"], capsys)
    one_line_exit_2(code, err, "--seqlen) 64 or less")


def test_9_config_naming_a_folder(tmp_path, assets, capsys):
    PruningConfig(method="wanda", sparsity=0.3).save_pretrained(tmp_path / "cfg")
    code, err = run_cli(["--config", tmp_path / "cfg", "--model", assets / "model", "--dataset", assets / "calib.txt",
                         "--num-samples", "2", "--seqlen", "32", "--no-progress", "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["method"] == "wanda"
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--config", tmp_path / "empty", "--model", assets / "model", "--output", tmp_path / "o2"], capsys)
    one_line_exit_2(code, err, "No pruning_config.json")


def test_9_a_damaged_checkpoint_file_is_refused_before_the_model_loads(tmp_path, assets, capsys, calib_ids,
                                                                      monkeypatch):
    interrupted_checkpoint(tmp_path / "ckpt", calib_ids)
    layer = tmp_path / "ckpt" / "layer-00000.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    import optimum_prune.pruner

    monkeypatch.setattr(optimum_prune.pruner, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, err = run_cli(args_for(assets, tmp_path / "out", "--checkpoint-dir", tmp_path / "ckpt", "--resume"), capsys)
    one_line_exit_2(code, err, "layer-00000.safetensors is damaged", "delete the checkpoint folder")


def test_9_format_version_message_names_no_none():
    with pytest.raises(PruningError) as info:
        PruningConfig.from_dict({"method": "wanda", "format_version": 99})
    assert "None" not in str(info.value)


# ------------------------------------------------------------------------------ 10. sparsity close to 1
@pytest.mark.parametrize("method", ["wanda", "alps", "fista", "sparsefw", "sparsegpt", "magnitude"])
def test_10_sparsity_close_to_one_never_empties_a_budget(method):
    """Per-row budgets (wanda, alps, fista, sparsefw) keep a weight in every row; per-matrix
    selections (magnitude, sparsegpt's column blocks) keep one in every matrix or block."""
    from optimum_prune.calibration.statistics import InputStatistics
    from optimum_prune.patterns import Target

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(16, 64, generator=g), torch.randn(300, 64, generator=g)
    cls = get_method(method)
    stats = InputStatistics(64, cls.statistics | {"sq_norm"})
    stats.update(X)
    options = {"alps": {"max_iter": 20}, "fista": {"iterations": 5, "rounds": 1}, "sparsefw": {"iterations": 10}}
    solver = cls(cls.parse_options(options.get(method, {})))
    (result,) = solver.prune_linears([W], stats, Target(0.999, PruningConfig().parsed_pattern))
    assert bool(torch.isfinite(result.weight).all())
    kept = result.weight != 0
    if method in ("sparsegpt", "magnitude"):
        assert kept.any()
    else:
        assert kept.any(dim=1).all(), "a row lost every weight"


# ------------------------------------------------------------------------------ 11. activations, Ctrl-C
def test_11_disk_activations_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    (tmp_path / "optimum-prune-activations-mine.txt").write_text("a file of the user's with a similar name")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, torch\nfrom optimum_prune.engine.activations import ActivationStore\n"
        f"store = ActivationStore('disk', {str(tmp_path)!r})\nstore.append(torch.ones(2, 3))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], env=ENV)
    assert killed.returncode == -signal.SIGKILL
    (stale,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert any(p.name.startswith("batch-") for p in stale.iterdir())
    live = ActivationStore("disk", tmp_path)  # the next run
    assert not stale.exists()
    other = ActivationStore("disk", tmp_path)  # a live store is left alone
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    live.close()
    other.close()
    assert [p.name for p in tmp_path.iterdir()] == ["optimum-prune-activations-mine.txt"]
    assert activations_module.remove_stale_folders(str(tmp_path)) == []


def test_11_ctrl_c_says_how_to_resume(tmp_path, assets, capsys, monkeypatch):
    from optimum_prune.engine import layerwise as engine_module

    original = engine_module.LayerwiseEngine._prune_layer

    def stop(self, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, index, *args)

    monkeypatch.setattr(engine_module.LayerwiseEngine, "_prune_layer", stop)
    code, err = run_cli(args_for(assets, tmp_path / "out", "--checkpoint-dir", tmp_path / "ckpt"), capsys)
    assert code == 130 and "2 of 4 layers are saved" in err and "--resume" in err, err
    assert not (tmp_path / "out").exists()
    code, err = run_cli(args_for(assets, tmp_path / "out2"), capsys)
    assert code == 130 and "--checkpoint-dir" in err, err
