"""Several processes: 2 CPU ranks with gloo under torchrun prune to the weights of one process."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from distributed_worker import calibration_ids, config, model_for
from safetensors.torch import load_file

from optimum_prune import Pruner
from optimum_prune.runtime import distributed


HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("method", ["sparsegpt", "fasp", "sparsegpt-moe", "expert-drop-moe"])
def test_two_gloo_processes_match_one_process(tmp_path, method):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "distributed_worker.py"), str(tmp_path), method],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / f"{method}-rank0.safetensors")
    rank1 = load_file(tmp_path / f"{method}-rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical on every rank

    reference = model_for(method)
    Pruner(config(method)).prune(reference, calibration_ids(), progress=False)
    expected = reference.state_dict()
    for key, value in rank0.items():
        assert value.shape == expected[key].shape, key
        # statistics summed in another order: equal up to float32 rounding
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert (tmp_path / f"{method}-model" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_single_process_helpers_are_no_ops():
    windows = torch.zeros(3, 4, dtype=torch.long)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard_windows(windows) is windows


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_texts, make_tokenizer

    root = tmp_path_factory.mktemp("dist-cli")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n\n".join(make_texts(40)))
    return root


def _cli_args(root, output, *extra):
    return ["--model", str(root / "model"), "--method", "sparsegpt", "--sparsity", "0.5", "--dataset",
            str(root / "calib.txt"), "--num-samples", "8", "--seqlen", "32", "--batch-size", "2", "--no-progress",
            "--output", str(output), *extra]


def test_cli_under_torchrun_matches_one_process(tiny_folder):
    from optimum_prune.commands.prune import main

    root = tiny_folder
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "optimum_prune.commands", *_cli_args(root, root / "two")],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(_cli_args(root, root / "one")) == 0
    two, one = load_file(root / "two" / "model.safetensors"), load_file(root / "one" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_cli_offload_with_max_memory_matches_in_memory(tiny_folder):
    from optimum_prune.commands.prune import main

    root = tiny_folder
    assert main(_cli_args(root, root / "offloaded", "--device-map", "auto", "--max-memory", "cpu=300KB",
                          "--offload-folder", str(root / "offload"), "--activations", "disk",
                          "--activation-folder", str(root / "activations"))) == 0
    assert not os.listdir(root / "activations")  # the batches' files are gone with the prune
    assert main(_cli_args(root, root / "in-memory")) == 0
    offloaded = load_file(root / "offloaded" / "model.safetensors")
    in_memory = load_file(root / "in-memory" / "model.safetensors")
    assert offloaded.keys() == in_memory.keys()
    for key in in_memory:
        torch.testing.assert_close(offloaded[key], in_memory[key], rtol=1e-5, atol=1e-6, msg=key)
    assert main(_cli_args(root, root / "x", "--max-memory", "cpu=1GB")) == 2  # needs --device-map
