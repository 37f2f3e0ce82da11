"""Zero-shot evaluation through lm-eval on a local task, and LoRA recovery after pruning."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_texts, make_tokenizer, tiny_model

from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.errors import PruningError
from optimum_prune.evaluation import perplexity
from optimum_prune.recovery import LoraRecoveryConfig, recover_lora


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_mc.jsonl")


def write_local_task(folder) -> str:
    """A multiple-choice lm-eval task over tests/data/tiny_mc.jsonl (no hub access)."""
    from optimum_prune.evaluation.zero_shot import local_multiple_choice_task

    return local_multiple_choice_task(str(folder), "tiny_mc", DATA)


def manual_accuracy(model, tokenizer) -> float:
    """argmax over choices of log p(" " + choice | question), the multiple-choice protocol."""
    correct = total = 0
    with open(DATA) as handle:
        for doc in map(json.loads, handle):
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + continuation])
                with torch.no_grad():
                    logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
                positions = range(len(context) - 1, ids.shape[1] - 1)
                scores.append(sum(float(logprobs[p, ids[0, p + 1]]) for p in positions))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
            total += 1
    return correct / total


def test_zero_shot_bridge_runs_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    from optimum_prune.evaluation import zero_shot

    model, tokenizer = tiny_model("llama"), make_tokenizer()
    results = zero_shot(model, tokenizer, "tiny_mc", include_path=write_local_task(tmp_path / "tasks"), batch_size=4)
    assert set(results) == {"tiny_mc"}
    assert results["tiny_mc"]["acc"] == pytest.approx(manual_accuracy(model, tokenizer))
    assert "acc_stderr" in results["tiny_mc"]
    with pytest.raises(PruningError, match="Unknown lm-eval task"):
        zero_shot(model, tokenizer, "no_such_task_xyz", include_path=str(tmp_path / "tasks"))


def test_zero_shot_without_lm_eval_names_the_fix(monkeypatch):
    from optimum_prune.evaluation import zero_shot

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(PruningError, match=r"pip install 'optimum-prune\[eval\]'"):
        zero_shot(tiny_model("llama"), make_tokenizer(), "boolq")


# ---------------------------------------------------------------------------------------------
def _linear_zeros(model):
    return {name: module.weight == 0 for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


@pytest.mark.parametrize("method, pattern, sparsity", [("wanda", "unstructured", 0.6), ("sparsegpt", "2:4", None),
                                                       ("fasp", "structured", 0.3)])
def test_lora_recovery_lowers_heldout_perplexity_and_keeps_the_pattern(tmp_path, method, pattern, sparsity):
    tokenizer = make_tokenizer()
    train, heldout = make_texts(200, seed=0), make_texts(40, seed=7)
    model = tiny_model("llama")
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, num_calibration_samples=16, seqlen=32,
                           channel_multiple=1)
    Pruner(config).prune(model, train, tokenizer=tokenizer, progress=False)
    zeros, shapes = _linear_zeros(model), {n: tuple(p.shape) for n, p in model.named_parameters()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    before = perplexity(model, tokenizer, heldout, seqlen=32, max_windows=32)

    windows = calibration_windows(train, tokenizer, 64, 32, seed=1)
    info = recover_lora(model, windows, LoraRecoveryConfig(steps=30, lr=1e-2, batch_size=8), progress=False)
    after = perplexity(model, tokenizer, heldout, seqlen=32, max_windows=32)
    assert after < 0.97 * before, (before, after)
    assert info["loss_last"] < info["loss_first"] and info["steps"] == 30
    # merged: plain modules again, same shapes, exactly the same zeros (for N:M: still 2:4)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    for name, mask in _linear_zeros(model).items():
        assert torch.equal(mask, zeros[name]) or pattern == "structured", name
    if pattern == "2:4":
        from optimum_prune.methods import satisfies_nm

        assert all(satisfies_nm(m.weight, 2, 4) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n)
    # the saved model needs no peft
    model.save_pretrained(tmp_path / "recovered")
    from safetensors.torch import load_file

    assert not any("lora" in key for key in load_file(tmp_path / "recovered" / "model.safetensors"))


def test_recovery_rejects_bad_settings():
    with pytest.raises(PruningError, match="recovery steps"):
        LoraRecoveryConfig(steps=0)
    with pytest.raises(PruningError, match="recovery lr"):
        LoraRecoveryConfig(lr=-1.0)
    with pytest.raises(PruningError, match="token windows"):
        recover_lora(tiny_model("llama"), torch.empty(0, 8, dtype=torch.long))
