"""Calibration sources, perplexity, and save -> reload with identical logits."""

import json
import math

import datasets
import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, PruningError, calibration_windows, perplexity, save_pruned
from optimum_prune.configuration import CONFIG_NAME


def test_sources_agree(tmp_path, tokenizer, texts):
    expected = calibration_windows(texts, tokenizer, 6, 16, seed=3)
    assert expected.shape == (6, 16)
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in texts]))
    assert torch.equal(calibration_windows(str(tmp_path / "c.txt"), tokenizer, 6, 16, seed=3), expected)
    assert torch.equal(calibration_windows(str(tmp_path / "c.jsonl"), tokenizer, 6, 16, seed=3), expected)
    assert torch.equal(calibration_windows(str(tmp_path / "c.json"), tokenizer, 6, 16, seed=3, text_column="body"), expected)
    assert torch.equal(calibration_windows(datasets.Dataset.from_dict({"text": texts}), tokenizer, 6, 16, seed=3), expected)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    as_ids = datasets.Dataset.from_dict({"input_ids": [ids]})
    assert torch.equal(calibration_windows(as_ids, None, 6, 16, seed=3), expected)
    assert torch.equal(calibration_windows(torch.tensor(ids), None, 6, 16, seed=3), expected)
    assert not torch.equal(calibration_windows(texts, tokenizer, 6, 16, seed=4), expected)  # the seed matters
    windows = torch.zeros(3, 16, dtype=torch.long)
    assert calibration_windows(windows, None, 6, 16) is not None  # ready-made windows are used as given


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([], "empty"),
        (["", "  "], "empty"),
        (["w1 w2 w3"], "fewer than seqlen=16"),
        ([1, 2], "must contain strings"),
        ("missing.jsonl", "not a readable"),
        (datasets.Dataset.from_dict({"content": ["w1"]}), "no column 'text'"),
        (3.5, "Unsupported calibration data"),
        (torch.zeros(2, 8, dtype=torch.long), "do not match seqlen=16"),
    ],
)
def test_bad_calibration_data(data, fragment, tokenizer):
    with pytest.raises(PruningError, match=fragment):
        calibration_windows(data, tokenizer, 4, 16)


def test_unknown_hub_dataset_is_a_clean_error(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PruningError, match="Could not load calibration dataset"):
        calibration_windows("no-such-org/no-such-dataset", tokenizer, 4, 16)


def test_perplexity_matches_manual_nll(tokenizer, texts):
    model = tiny_model("llama")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 3 * 32]).reshape(3, 32)
    with torch.no_grad():
        out = model(input_ids=windows, labels=windows)
    assert perplexity(model, tokenizer, texts, seqlen=32, max_windows=3, batch_size=2) == pytest.approx(
        math.exp(float(out.loss)), rel=1e-5
    )


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_save_reload_identical_logits(tmp_path, arch, tokenizer, texts):
    model = tiny_model(arch)
    cfg = PruningConfig(method="sparsegpt", sparsity=0.6, num_calibration_samples=8, seqlen=32, batch_size=4)
    pruner = Pruner(cfg)
    pruner.prune(model, texts, tokenizer=tokenizer, progress=False)
    out = pruner.save_pretrained(tmp_path / "pruned", tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(40).unsqueeze(0) % 200
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert PruningConfig.from_pretrained(out) == cfg
    assert reloaded.config.pruning_config["method"] == "sparsegpt"
    assert PruningConfig.from_dict(reloaded.config.pruning_config) == cfg
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp")]


def test_output_folder_rules(tmp_path):
    model = tiny_model("llama")
    cfg = PruningConfig(method="magnitude")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(PruningError, match="exists and is not empty"):
        save_pruned(model, target, cfg)
    with pytest.raises(PruningError, match="not an optimum-prune output"):  # overwrite replaces only our outputs
        save_pruned(model, target, cfg, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    previous = tmp_path / "previous"
    save_pruned(model, previous, cfg)
    (previous / "notes.txt").write_text("x")  # a file of the user's: the folder is not only our output any more
    with pytest.raises(PruningError, match="it holds notes.txt, which the save did not write"):
        save_pruned(model, previous, cfg, overwrite=True)
    assert (previous / "notes.txt").read_text() == "x"
    (previous / "notes.txt").unlink()
    save_pruned(model, previous, cfg, overwrite=True)
    assert (previous / CONFIG_NAME).is_file() and not (previous / "notes.txt").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "out", PruningConfig(method="magnitude"))
    assert list(tmp_path.iterdir()) == []
