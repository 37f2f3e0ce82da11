"""Trust, second round (issue #40): one test per numbered class of defect the adversarial pass
found; each failed on the main before the fix. Classes 1 and 2 (families that crash, coverage
that counts only what it recognises) are in tests/test_families_sweep.py.

CLI runs are in process (`optimum_prune.commands.prune.main`), with the helpers of test_safety.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import uuid

import pytest
import torch
from conftest import make_texts, make_tokenizer, tiny_model
from test_safety import args_for, assets, no_model_load, one_line_exit_2, quiet_progress_bars, run_cli, snapshot  # noqa: F401

from optimum_prune import Pruner, PruningConfig, save_pruned
from optimum_prune import configuration as configuration_module
from optimum_prune import output as output_module
from optimum_prune import pruner as pruner_module
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.engine import checkpoint as checkpoint_module
from optimum_prune.engine.checkpoint import STATE_NAME
from optimum_prune.errors import PruningError
from optimum_prune.output import OUTPUT_MARKER


@pytest.fixture
def no_prune(monkeypatch):
    """Fail the test if the prune starts (a check that can be made before it came too late)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the prune started before the problem was refused")

    monkeypatch.setattr(pruner_module.Pruner, "prune", refuse)


# ------------------------------------------------------------------------------ 3. --overwrite needs proof
def test_3_overwrite_refuses_a_recipe_folder_of_the_users(tmp_path, assets, capsys, no_model_load):
    recipe = tmp_path / "recipe"
    PruningConfig(method="sparsegpt", sparsity=0.5).save_pretrained(recipe)  # as the README shows
    code, err = run_cli(args_for(assets, recipe, "--overwrite"), capsys)
    one_line_exit_2(code, err, "not an optimum-prune output", OUTPUT_MARKER)
    (recipe / "notes.md").write_text("why these settings")
    before = snapshot(recipe)
    code, err = run_cli(args_for(assets, recipe, "--overwrite"), capsys)
    one_line_exit_2(code, err, "not an optimum-prune output")
    assert snapshot(recipe) == before


def test_3_overwrite_replaces_a_proven_output_and_refuses_a_changed_one(tmp_path, assets, capsys):
    out = tmp_path / "out"
    assert run_cli(args_for(assets, out), capsys)[0] == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {OUTPUT_MARKER}
    assert run_cli(args_for(assets, out, "--overwrite"), capsys)[0] == 0  # only our files: replaced
    with open(out / "README.md", "a", encoding="utf-8") as handle:
        handle.write("\nmy notes on this model\n")
    code, err = run_cli(args_for(assets, out, "--overwrite"), capsys)
    one_line_exit_2(code, err, "README.md changed since the save wrote it")
    assert (out / "README.md").read_text().endswith("my notes on this model\n")


# ------------------------------------------------------------------------------ 4. hidden folders by name
def test_4_folders_named_like_ours_are_never_claimed(tmp_path, assets, capsys):
    staging, aside = tmp_path / ".out.tmp-0a1b2c3d", tmp_path / ".out.old-0a1b2c3d"
    for folder in (staging, aside):
        folder.mkdir()
        (folder / "data.bin").write_bytes(b"the user's")
    code, _ = run_cli(args_for(assets, tmp_path / "out"), capsys)
    assert code == 0
    assert (staging / "data.bin").read_bytes() == b"the user's" and (aside / "data.bin").read_bytes() == b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-0a1b2c3d", ".out.tmp-0a1b2c3d", "out"]
    assert OUTPUT_MARKER in {p.name for p in (tmp_path / "out").iterdir()}  # the output is the new save, not `aside`


def test_4_an_interrupted_save_is_cleaned_from_its_lock_record(tmp_path, monkeypatch):
    """A save interrupted after its staging folder was made leaves the lock file with the record;
    the next save of that output removes the staging folder it names."""
    real_swap = output_module.OutputFolder._swap_in

    def killed(self, staging):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_module.OutputFolder, "_swap_in", killed)
    monkeypatch.setattr(output_module, "remove_tree", lambda path: None)  # the kill lands before the cleanup too
    with pytest.raises(KeyboardInterrupt):
        save_pruned(tiny_model("llama"), tmp_path / "out", PruningConfig(method="magnitude"))
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    record = json.loads((tmp_path / ".out.lock").read_text())
    assert record["made"] == [str(left)]
    monkeypatch.undo()
    assert output_module.OutputFolder._swap_in is real_swap
    save_pruned(tiny_model("llama"), tmp_path / "out", PruningConfig(method="magnitude"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ 5. one line, exit 2
@contextlib.contextmanager
def small_disk(parent, size: str):
    """A tmpfs of ``size`` at ``parent/disk`` (None where this machine may not mount one)."""
    mount = parent / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def full_disk_writes(monkeypatch, module, name: str, after: int = 0):
    """The fallback of `small_disk`: ``module.name`` (a writer) fails with ENOSPC from call ``after`` on."""
    real, calls = getattr(module, name), []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, write)


def test_5_a_disk_too_small_for_the_model_is_refused_before_the_prune(tmp_path, assets, capsys, no_prune, monkeypatch):
    with small_disk(tmp_path, "64k") as disk:
        if disk is None:  # no tmpfs: the disk reports 64 KiB free
            disk = tmp_path
            monkeypatch.setattr(output_module, "free_bytes", lambda path: 64 * 1024)
        code, err = run_cli(args_for(assets, disk / "out"), capsys)
        one_line_exit_2(code, err, "free", "takes about")
        assert not (disk / "out").exists()


def test_5_no_space_while_saving_is_one_line_and_leaves_nothing(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.setattr(pruner_module, "check_free_space", lambda *args: None)  # the disk fills during the run
    with small_disk(tmp_path, "64k") as disk:
        if disk is None:
            disk = tmp_path / "disk"
            disk.mkdir()
            full_disk_writes(monkeypatch, output_module, "write_marker")
        code, err = run_cli(args_for(assets, disk / "out"), capsys)
        one_line_exit_2(code, err, "No space left", "nothing was written")
        assert list(disk.iterdir()) == []


def test_5_no_space_while_checkpointing_keeps_the_committed_layers(tmp_path, assets, capsys, monkeypatch):
    with small_disk(tmp_path, "300k") as disk:
        if disk is None:
            disk = tmp_path / "disk"
            disk.mkdir()
            full_disk_writes(monkeypatch, checkpoint_module, "save_batches", after=1)
        ckpt = disk / "ckpt"
        code, err = run_cli(args_for(assets, tmp_path / "out", "--checkpoint-dir", ckpt), capsys)
        one_line_exit_2(code, err, "No space left", "--resume")
        state = json.loads((ckpt / STATE_NAME).read_text())
        assert state["next_layer"] >= 1 and not list(ckpt.glob("*.tmp"))
        assert not (tmp_path / "out").exists()


def test_5_bad_values_are_one_line_before_the_model_loads(tmp_path, assets, capsys, no_model_load):
    cases = [(["--output", ""], "--output is empty"),
             (["--seed", str(2**64 + 1)], "seed must be an integer in [0, 4294967294]"),
             (["--device", "banana"], "not a device torch knows"),
             (["--device", "meta"], "cannot compute")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda:0"], "not available on this machine"))
    else:
        cases.append((["--device", f"cuda:{torch.cuda.device_count()}"], "does not exist"))
    for extra, fragment in cases:
        argv = args_for(assets, tmp_path / "out")
        if extra[0] == "--output":
            argv[argv.index("--output") + 1] = extra[1]
        else:
            argv += extra
        code, err = run_cli(argv, capsys)
        one_line_exit_2(code, err, fragment)
    os.mkfifo(tmp_path / "fifo")
    code, err = run_cli(args_for(assets, tmp_path / "fifo"), capsys)
    one_line_exit_2(code, err, "is a FIFO (named pipe); choose a folder")
    code, err = run_cli(args_for(assets, "/dev/null"), capsys)
    one_line_exit_2(code, err, "is a device file")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_cli(args_for(assets, tmp_path / "out", "--config", deep), capsys)
    one_line_exit_2(code, err, "nested too deeply")
    code, err = run_cli(args_for(assets, tmp_path / "out", "--method-kwargs", "{\"a\":" * 100_000 + "1" + "}" * 100_000),
                        capsys)
    one_line_exit_2(code, err, "nested too deeply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.json", "fifo"]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_5_meta_weights_through_the_python_api_are_refused(method):
    with torch.device("meta"):
        model = tiny_model("llama")
    ids = torch.randint(0, 256, (4, 32))
    with pytest.raises(PruningError, match="on the meta device"):
        Pruner(PruningConfig(method=method, sparsity=0.5, num_calibration_samples=4, seqlen=32)).prune(
            model, ids, progress=False)


# ------------------------------------------------------------------------------ 6. --dry-run checks as much
def test_6_dry_run_refuses_what_the_real_run_refuses(tmp_path, assets, capsys, no_model_load):
    dry = [a for a in args_for(assets, tmp_path / "x") if a not in ("--output", str(tmp_path / "x"))] + ["--dry-run"]
    code, err = run_cli(dry + ["--seqlen", "100000"], capsys)
    one_line_exit_2(code, err, "longer than this model's 256 positions")
    (tmp_path / "a-file").write_text("x")
    code, err = run_cli(dry + ["--output", tmp_path / "a-file"], capsys)
    one_line_exit_2(code, err, "is a file; choose a folder")
    code, err = run_cli(dry + ["--eval"], capsys)
    one_line_exit_2(code, err, "--eval needs --eval-dataset")
    code, err = run_cli(dry, capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------ 7. local names stay local
def test_7_local_looking_names_are_one_line_at_once(tmp_path, assets, capsys, monkeypatch, no_model_load):
    def hub(*args, **kwargs):
        raise AssertionError("a local-looking name was sent to the Hub")

    import huggingface_hub
    import transformers

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(configuration_module, "_hub_config", hub, raising=False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in ("models/missing", "./missing", str(tmp_path / "missing")):
        argv = args_for(assets, tmp_path / "out")
        argv[argv.index("--model") + 1] = model
        code, err = run_cli(argv, capsys)
        one_line_exit_2(code, err, "does not exist")
    for config in ("models/recipe.json", "recipe.json", "./recipes"):
        code, err = run_cli(args_for(assets, tmp_path / "out", "--config", config), capsys)
        one_line_exit_2(code, err, "does not exist")


# ------------------------------------------------------------------------------ 8. smaller
def test_8_an_empty_eval_dataset_is_named_as_the_evaluation_text(tmp_path, assets, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(args_for(assets, tmp_path / "out", "--eval", "--eval-dataset", tmp_path / "empty.txt"), capsys)
    one_line_exit_2(code, err, "The evaluation text is empty")


def test_8_a_long_string_is_not_taken_for_a_dataset_name():
    text = "A paragraph of calibration text that the user meant as text, not a dataset name. " * 20
    with pytest.raises(PruningError, match="texts go in a list") as caught:
        calibration_windows(text, make_tokenizer(), 4, 32)
    assert len(str(caught.value)) < 300  # quoted short, not whole


def test_8_more_windows_than_the_data_holds_are_warned(caplog):
    texts = make_texts(2)
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        windows = calibration_windows(texts, make_tokenizer(), 64, 16)
    assert windows.shape == (64, 16)
    assert any("overlap" in r.getMessage() and "--num-samples" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        calibration_windows(make_texts(40), make_tokenizer(), 4, 16)
    assert not caplog.records
