"""The Optimum configuration and the Hub workflow: `PruningConfig` is an Optimum `BaseConfig` that
loads from a folder, a file or a Hub repo id (read from the local Hub cache here, offline), old
configs still load, and publishing uploads exactly the saved folder, only after the save succeeded."""

from __future__ import annotations

import json

import pytest

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.configuration import CONFIG_NAME


def test_is_an_optimum_configuration():
    from optimum.configuration_utils import BaseConfig

    assert issubclass(PruningConfig, BaseConfig) and PruningConfig.CONFIG_NAME == CONFIG_NAME == "pruning_config.json"
    with pytest.raises(PruningError, match="Unknown pruning config field.*spasity"):
        PruningConfig(spasity=0.5)
    data = PruningConfig(method="wanda").to_dict()
    assert set(data) == {*PruningConfig.field_names(), "format_version", "optimum_prune_version"}


def _hub_cache(root, repo_id, files_by_revision):
    """A Hub cache folder as huggingface_hub lays it out: refs/<revision> -> snapshots/<commit>/files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for index, (revision, files) in enumerate(files_by_revision.items()):
        commit = f"{index + 1:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        for name, content in files.items():
            path = repo / "snapshots" / commit / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return root


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_from_pretrained_reads_a_hub_repo_from_the_cache(tmp_path, offline):
    main, tagged = PruningConfig(method="wanda", sparsity=0.4), PruningConfig(method="sparsegpt", pattern="2:4")
    model_card = PruningConfig(method="magnitude", sparsity=0.3)
    cache = _hub_cache(tmp_path / "cache", "org/pruned", {
        "main": {CONFIG_NAME: main.to_json_string(), f"sub/{CONFIG_NAME}": tagged.to_json_string()},
        "v1": {CONFIG_NAME: tagged.to_json_string()},
    })
    _hub_cache(cache, "org/model-only", {"main": {"config.json": json.dumps({"pruning_config": model_card.to_dict()})}})
    assert PruningConfig.from_pretrained("org/pruned", cache_dir=cache) == main
    assert PruningConfig.from_pretrained("org/pruned", cache_dir=cache, revision="v1") == tagged
    assert PruningConfig.from_pretrained("org/pruned", cache_dir=cache, subfolder="sub") == tagged
    assert PruningConfig.from_pretrained("org/pruned", cache_dir=cache, token="hf_x", seed=3).seed == 3
    assert PruningConfig.from_pretrained("org/model-only", cache_dir=cache) == model_card
    with pytest.raises(PruningError, match="not in the local Hub cache"):
        PruningConfig.from_pretrained("org/missing", cache_dir=cache)
    with pytest.raises(PruningError, match="neither a local file or folder nor a Hub repo id"):
        PruningConfig.from_pretrained("not a//repo", cache_dir=cache)


def test_configs_of_earlier_releases_and_of_optimums_own_save_load(tmp_path):
    old = {"method": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured", "targets": None, "ignore": [],
           "overrides": {}, "num_calibration_samples": 64, "seqlen": 512, "batch_size": 8, "seed": 0,
           "dampening": 0.01, "sequential": True, "dataset": None, "dataset_config": None, "dataset_split": "train",
           "text_column": "text", "method_kwargs": {}}  # format 1 before channel_multiple and the MoE fields
    (tmp_path / CONFIG_NAME).write_text(json.dumps(old))
    loaded = PruningConfig.from_pretrained(tmp_path)
    assert loaded.sparsity == 0.5 and loaded.expert_calibration == "routed"
    written = {**PruningConfig(method="wanda").to_dict(), "transformers_version": "5.0.0", "optimum_version": "2.3.0"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(written))
    assert PruningConfig.from_pretrained(tmp_path / CONFIG_NAME).method == "wanda"


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        import os

        if FakeApi.fail:
            raise ConnectionError("the Hub cannot be reached")
        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs)
        FakeApi.calls.append(("upload_folder", repo_id, folder_path, files))
        return "https://huggingface.co/org/x/commit/abc"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def _pruned(tmp_path):
    from conftest import tiny_model

    pruner = Pruner(PruningConfig(method="magnitude", sparsity=0.5))
    pruner.prune(tiny_model("llama"), None, progress=False)
    return pruner


def test_push_uploads_exactly_the_saved_folder(tmp_path, fake_hub):
    from conftest import make_tokenizer

    pruner = _pruned(tmp_path)
    with pytest.raises(PruningError, match="save_pretrained"):
        pruner.push_to_hub("org/x")
    assert fake_hub.calls == []  # nothing saved: nothing uploaded
    folder = pruner.save_pretrained(tmp_path / "out", tokenizer=make_tokenizer(), push_to_hub=True, repo_id="org/x",
                                    private=True)
    (create, repo, options), (upload, repo2, path, files) = fake_hub.calls
    assert (create, repo, options["private"], upload, repo2, path) == ("create_repo", "org/x", True, "upload_folder",
                                                                      "org/x", folder)
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"model.safetensors", "config.json", CONFIG_NAME, "README.md", "tokenizer.json"} <= set(files)
    assert "[org/x](https://huggingface.co/org/x)" in (tmp_path / "out" / "README.md").read_text()


def test_a_failed_upload_keeps_the_folder_and_says_so(tmp_path, fake_hub):
    pruner = _pruned(tmp_path)
    fake_hub.fail = True
    with pytest.raises(PruningError, match="the local folder is kept"):
        pruner.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/x")
    assert (tmp_path / "out" / CONFIG_NAME).is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_pushes_only_after_a_successful_save(tmp_path, fake_hub, capsys):
    from conftest import make_texts, make_tokenizer, tiny_model

    from optimum_prune.commands.prune import main

    tiny_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    base = ["--model", str(tmp_path / "model"), "--method", "wanda", "--dataset", str(tmp_path / "calib.txt"),
            "--num-samples", "4", "--seqlen", "32", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "bad"), "--push-to-hub", "org/bad//id"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*base, "--seqlen", "100000", "--output", str(tmp_path / "fails"), "--push-to-hub", "org/x"]) == 2
    assert fake_hub.calls == []  # the prune failed: nothing uploaded
    assert main([*base, "--output", str(tmp_path / "out"), "--push-to-hub", "org/x", "--hub-private"]) == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][2]["private"] is True and fake_hub.calls[1][2] == str(tmp_path / "out")
    assert "uploaded to https://huggingface.co/org/x" in capsys.readouterr().out
    fake_hub.fail = True
    assert main([*base, "--output", str(tmp_path / "out2"), "--push-to-hub", "org/x"]) == 2
    assert "the local folder is kept" in capsys.readouterr().err and (tmp_path / "out2" / CONFIG_NAME).is_file()


def test_config_push_to_hub_uploads_the_json(fake_hub, monkeypatch):
    uploaded = {}

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        uploaded.update(json.loads(open(path_or_fileobj).read()), _where=(repo_id, path_in_repo))
        return "url"

    monkeypatch.setattr(FakeApi, "upload_file", upload_file, raising=False)
    PruningConfig(method="wanda", sparsity=0.3).push_to_hub("org/cfg")
    assert uploaded["_where"] == ("org/cfg", CONFIG_NAME) and uploaded["sparsity"] == 0.3
