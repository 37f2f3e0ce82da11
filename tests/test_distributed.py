"""Several processes: 2 CPU ranks with gloo under torchrun prune to the weights of one process; with
the layer's solves shared between them, to exactly the weights of the 2-process run where every
process solves everything; killed and resumed, to the weights of the uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from distributed_worker import METHODS, calibration_ids, config, model_for
from safetensors.torch import load_file

from optimum_prune import Pruner
from optimum_prune.runtime import distributed


HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args, env=None, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "distributed_worker.py"), *map(str, args)],
        capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})},
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_shared_solves_are_bit_identical_to_every_process_solving_everything(tmp_path):
    """Every layer-wise method and every kind of work (Linears unstructured and N:M, stacked, rows split
    between the processes (FISTA), channel groups, expert banks, whole experts, narrowed experts):
    each piece solved by one process and handed to the other gives exactly the weights of both
    solving everything."""
    torchrun(tmp_path, "compare", *METHODS)
    for method in METHODS:
        files = {(mode, rank): load_file(tmp_path / f"{method}-{mode}-rank{rank}.safetensors")
                 for mode in ("shared", "everywhere") for rank in (0, 1)}
        reference = files["everywhere", 0]
        changed = 0
        for (mode, rank), found in files.items():
            assert found.keys() == reference.keys(), (method, mode, rank)
            for key in reference:
                assert torch.equal(found[key], reference[key]), (method, mode, rank, key)
        dense = model_for(method).state_dict()
        changed = sum(not torch.equal(reference[k], dense[k]) for k in reference if dense[k].shape == reference[k].shape)
        assert changed or any(dense[k].shape != reference[k].shape for k in reference), method  # it pruned


@pytest.mark.parametrize("method", ["sparsegpt", "fasp", "sparsegpt-moe", "expert-drop-moe"])
def test_two_gloo_processes_match_one_process(tmp_path, method):
    torchrun(tmp_path, method)
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


@pytest.mark.parametrize("kill", ["1:solve:9", "1:commit:2"])
def test_killed_process_resumes_to_the_uninterrupted_weights(tmp_path, kill):
    """A process killed in the middle of a layer's solves, or between its own commit and the other's
    (the other one layer ahead: it rewinds), then resumed by both: the weights of a run never killed."""
    method = "fista"
    torchrun(tmp_path / "whole", "checkpoint", method)
    killed = torchrun(tmp_path / "cut", "checkpoint", method, f"kill={kill}", check=False)
    assert killed.returncode != 0
    folders = sorted(p.name for p in (tmp_path / "cut" / "checkpoint").iterdir())
    assert folders == ["rank-0-of-2", "rank-1-of-2"]
    done = [json.loads((tmp_path / "cut" / "checkpoint" / f / "checkpoint.json").read_text())["next_layer"]
            for f in folders]
    assert 1 <= min(done) and max(done) - min(done) <= 1 and max(done) < 3, done
    if "commit" in kill:  # process 1 died before its second commit; process 0 may have made it
        assert done[1] == 1, done
    torchrun(tmp_path / "cut", "checkpoint", method, "resume")
    for rank in (0, 1):
        whole = load_file(tmp_path / "whole" / f"{method}-checkpoint-rank{rank}.safetensors")
        resumed = load_file(tmp_path / "cut" / f"{method}-checkpoint-rank{rank}.safetensors")
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (rank, key)


def test_a_process_failing_its_share_stops_every_process_with_one_line(tmp_path):
    """A solve that fails on one process only (here: its pieces raise) must not leave the other
    waiting for results forever: both stop, the other naming the failed process."""
    result = torchrun(tmp_path, "sparsegpt", env={"OPTIMUM_PRUNE_TEST_FAIL_RANK": "1"}, check=False)
    assert result.returncode != 0
    assert "Process 1 failed while solving its share of the layer" in result.stderr


def test_recovery_is_data_parallel_under_several_processes(tmp_path):
    """Distillation (KL, cross-entropy share, hidden term) and LoRA under 2 gloo processes: each
    trains on its half of every batch, the gradients are averaged, so both processes end with
    identical weights, those of one process on the whole batches (up to float summation order),
    and the recorded losses are the whole batches'. Killed mid-distillation, the same run with
    ``resume`` continues from the state one process saved to the uninterrupted weights."""
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(single), "recover"], check=True,
                   env={k: v for k, v in ENV.items() if k != "WORLD_SIZE"}, timeout=600)
    torchrun(tmp_path, "recover")
    ranks = [load_file(tmp_path / f"recover-rank{rank}.safetensors") for rank in (0, 1)]
    one = load_file(single / "recover-rank0.safetensors")
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)
    assert all(torch.allclose(ranks[0][k], one[k], atol=1e-5, rtol=1e-4) for k in one)
    zeros = [k for k in one if ".layers." in k and k.endswith("proj.weight")]
    assert zeros and all(torch.equal(ranks[0][k] == 0, one[k] == 0) for k in zeros)  # the masks kept
    losses = [json.loads((tmp_path / f"recover-rank{rank}.json").read_text()) for rank in (0, 1)]
    reference = json.loads((single / "recover-rank0.json").read_text())
    assert losses[0] == losses[1] and reference["distill"] == pytest.approx(losses[0]["distill"], rel=1e-4)

    cut = tmp_path / "cut"
    cut.mkdir()
    killed = torchrun(cut, "recover", "kill=1:6", check=False)  # steps 1-4 saved
    assert killed.returncode != 0 and not (cut / "recover-rank0.safetensors").exists()
    torchrun(cut, "recover", "resume")
    resumed = load_file(cut / "recover-rank0.safetensors")
    assert all(torch.equal(resumed[k], ranks[0][k]) for k in one)
    assert not (cut / "recover-checkpoint" / "distill-state.pt").exists()


def test_assignment_balances_by_cost_and_is_the_same_everywhere():
    from optimum_prune.engine.solves import row_blocks

    costs = [4.95, 0.85, 1.11, 3.86]
    owners = distributed.assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert owners == distributed.assign(list(costs), 2) and max(loads) == pytest.approx(5.8)
    assert distributed.assign([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    assert row_blocks(10, 3) == [(0, 3), (3, 7), (7, 10)] and row_blocks(2, 4) == [(0, 1), (1, 2)]


def test_single_process_helpers_are_no_ops():
    windows = torch.zeros(3, 4, dtype=torch.long)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard_windows(windows) is windows
    assert distributed.min_over_ranks(3) == 3 and not distributed.solves_shared()


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
    """The prune and the distillation after it (data-parallel: each process half of every batch);
    a batch the processes cannot share is refused in one line before any work."""
    from optimum_prune.commands.prune import main

    root = tiny_folder
    recover = ("--recover", "distill", "--recover-steps", "4", "--recover-samples", "8", "--recover-lr", "1e-3")

    def two(output, *extra):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "optimum_prune.commands", *_cli_args(root, output, *recover, *extra)],
            capture_output=True, text=True, timeout=300, env=ENV,
        )

    refused = two(root / "refused", "--recover-batch-size", "1")
    assert refused.returncode != 0 and not (root / "refused").exists()
    assert "cannot be shared by 2 processes" in refused.stderr and "--recover-batch-size" in refused.stderr
    result = two(root / "two", "--recover-batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(_cli_args(root, root / "one", *recover, "--recover-batch-size", "2")) == 0
    two, one = load_file(root / "two" / "model.safetensors"), load_file(root / "one" / "model.safetensors")
    for key in one:  # the prune's last bits differ (statistics summed over two processes); AdamW's
        # normalised steps can carry that to ~1e-4 on a few weights whose gradients are near zero
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4, msg=key)
    results = [json.loads((root / name / "pruning_results.json").read_text())["recovery"] for name in ("one", "two")]
    assert results[1]["losses"] == pytest.approx(results[0]["losses"], rel=1e-4)


def test_accelerate_launch_runs_the_same_shared_prune_as_torchrun(tiny_folder):
    """`accelerate launch` and `torchrun` (2 processes, gloo on the CPU) run the same code path:
    identical weights, different from one process's in the last bits (the statistics summed over two
    processes). accelerate's `--cpu` launches one process unless MPI is set up; `--multi_gpu` launches
    the processes through torch.distributed on any machine."""
    from optimum_prune.commands.prune import main

    root = tiny_folder
    launchers = {"accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}
    for name, launcher in launchers.items():
        result = subprocess.run([*launcher, "-m", "optimum_prune.commands", *_cli_args(root, root / name)],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert result.returncode == 0, result.stderr[-3000:]
    assert main(_cli_args(root, root / "single")) == 0
    found = {name: load_file(root / name / "model.safetensors") for name in (*launchers, "single")}
    assert all(torch.equal(found["accelerate"][k], found["torchrun"][k]) for k in found["torchrun"])
    assert not all(torch.equal(found["single"][k], found["torchrun"][k]) for k in found["torchrun"])


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
