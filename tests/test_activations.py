"""Where the calibration activations wait between layers: device, CPU or disk give the same prune."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import prune_interrupted, tiny_model
from safetensors.torch import load_file

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import layerwise as engine_module
from optimum_prune.engine.activations import ActivationStore
from optimum_prune.engine.checkpoint import STATE_NAME, save_batches
from optimum_prune.errors import PruningError


LAYERS = 3


def fresh():
    return tiny_model("llama", num_hidden_layers=LAYERS)


def config(method, pattern, **kw):
    sparsity = None if ":" in pattern else 0.4
    return PruningConfig(method=method, pattern=pattern, sparsity=sparsity, num_calibration_samples=8, seqlen=32,
                         batch_size=3, channel_multiple=1, **kw)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    assert not different, different


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_store_round_trips_bit_for_bit(tmp_path, dtype):
    store = ActivationStore("disk", tmp_path)
    batches = [torch.randn(3, 5, 7).to(dtype), torch.randn(1, 5, 7).to(dtype)]  # last batch smaller
    for x in batches:
        store.append(x)
    assert len(store) == 2 and store.nbytes() == 0  # nothing held in memory
    for got, want in zip(store, batches):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(store[-1], batches[-1]) and len(store[0:2]) == 2
    sibling = store.like()
    assert sibling.where == "disk" and len(sibling) == 0
    (folder,) = [p for p in tmp_path.iterdir() if any(f.name.startswith("batch-") for f in p.iterdir())]
    store.close()
    sibling.close()
    assert not folder.exists() and not list(tmp_path.iterdir())


def test_checkpoint_writes_a_disk_store_reading_each_batch_once(tmp_path, monkeypatch):
    store = ActivationStore("disk", tmp_path / "store")
    batches = [torch.randn(3, 5, 7), torch.randn(1, 5, 7).to(torch.bfloat16)]
    for x in batches:
        store.append(x)
    assert store.spec(1) == (torch.Size([1, 5, 7]), torch.bfloat16)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or load(*a, **kw))
    save_batches(store, str(tmp_path / "inputs.safetensors"))
    assert len(reads) == len(batches)
    saved = load_file(tmp_path / "inputs.safetensors")
    assert all(torch.equal(saved[str(i)], x) for i, x in enumerate(batches))
    store.close()


def test_cpu_store_moves_to_cpu_and_device_store_keeps_the_tensor():
    x = torch.randn(2, 3)
    assert ActivationStore("device").like().where == "device"
    kept = ActivationStore("device")
    kept.append(x)
    assert kept[0] is x
    cpu = ActivationStore("cpu")
    cpu.append(x)
    assert cpu[0].device.type == "cpu" and cpu.nbytes() == x.numel() * 4


@pytest.mark.parametrize(
    "method, pattern, kwargs",
    [
        ("sparsegpt", "unstructured", {}),
        ("fista", "2:4", {"iterations": 4, "rounds": 1}),  # error correction: the staged engine path
        ("fasp", "structured", {}),
        ("wanda", "unstructured", {"sequential": False}),  # one pass per layer feeds the next layer
    ],
)
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_activation_places_give_identical_weights(tmp_path, calib_ids, method, pattern, kwargs, where):
    sequential = kwargs.pop("sequential", True)
    cfg = config(method, pattern, method_kwargs=kwargs, sequential=sequential)
    reference = fresh()
    Pruner(cfg).prune(reference, calib_ids, progress=False)
    model = fresh()
    folder = tmp_path / "activations" if where == "disk" else None
    Pruner(cfg).prune(model, calib_ids, progress=False, activations=where, activation_folder=folder)
    assert_same_weights(reference, model)
    if folder is not None:
        assert folder.exists() and not list(folder.iterdir())  # every batch file deleted with its layer


def test_disk_activations_hold_only_one_batch_while_a_layer_runs(tmp_path, calib_ids, monkeypatch):
    seen = []
    original = engine_module.run_layer

    def watch(layer, inputs, kwargs, device, collectors=(), keep=True):
        seen.append((type(inputs).__name__, inputs.nbytes() if isinstance(inputs, ActivationStore) else None))
        return original(layer, inputs, kwargs, device, collectors, keep)

    monkeypatch.setattr(engine_module, "run_layer", watch)
    Pruner(config("sparsegpt", "unstructured")).prune(fresh(), calib_ids, progress=False, activations="disk",
                                                      activation_folder=tmp_path)
    layer_passes = [s for s in seen if s[0] == "ActivationStore"]
    assert layer_passes and all(nbytes == 0 for _, nbytes in layer_passes)


def test_resume_with_disk_activations(tmp_path, calib_ids):
    cfg = config("sparsegpt", "unstructured")
    reference = fresh()
    Pruner(cfg).prune(reference, calib_ids, progress=False)
    prune_interrupted(cfg, fresh(), calib_ids, 2, checkpoint_dir=tmp_path / "ckpt", activations="disk",
                      activation_folder=tmp_path / "act")
    assert not list((tmp_path / "act").iterdir())  # an interrupted prune still removes its batch files
    # the checkpoint's inputs file is written batch by batch; it is a valid safetensors file
    state = json.loads((tmp_path / "ckpt" / STATE_NAME).read_text())
    saved = load_file(tmp_path / "ckpt" / state["inputs"])
    assert sorted(saved, key=int) == [str(i) for i in range(3)] and saved["0"].shape == (3, 32, 64)
    assert saved["2"].shape[0] == 2

    resumed = fresh()
    Pruner(cfg).prune(resumed, calib_ids, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True,
                      activations="disk", activation_folder=tmp_path / "act")
    assert_same_weights(reference, resumed)


def test_bad_activation_settings_are_refused(calib_ids, tmp_path):
    cfg = config("magnitude", "unstructured")
    with pytest.raises(PruningError, match="activations must be one of device, cpu, disk"):
        Pruner(cfg).prune(fresh(), calib_ids, activations="gpu")
    with pytest.raises(PruningError, match="activations='disk'"):
        Pruner(cfg).prune(fresh(), calib_ids, activation_folder=tmp_path)
    assert not os.listdir(tmp_path)
