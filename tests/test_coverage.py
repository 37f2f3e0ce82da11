"""The report never overstates (issue #23): it says which share of the decoder layers' weights the
prune targeted, and names the tensors it cannot prune (experts stored in a way the engine cannot
calibrate, such as Llama-4's batched experts) with a warning, in the report, the CLI and the model
card. Fused expert banks of the common layouts are pruned (tests/test_experts.py)."""

from __future__ import annotations

import json
import logging

import families
import pytest
import torch
from conftest import VOCAB, make_texts, make_tokenizer

from optimum_prune import Pruner, PruningConfig
from optimum_prune.commands.prune import main


def build(family):
    return families.build(family)


def layer_matrices(model):
    """(zeros, weights) over the weight matrices of the decoder layers (routers and biases left out)."""
    params = [p for name, p in model.model.layers.named_parameters()
              if p.dim() >= 2 and not name.endswith("bias") and ".router." not in name]
    return sum(int((p == 0).sum()) for p in params), sum(p.numel() for p in params)


def prune(model, **config):
    pruner = Pruner(PruningConfig(**{"method": "wanda", "sparsity": 0.5, "num_calibration_samples": 4, "seqlen": 32,
                                     **config}))
    pruner.prune(model, torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0)), progress=False)
    return pruner.report


def test_experts_left_dense_are_counted_and_named(caplog):
    model = build("llama4_text")
    with caplog.at_level(logging.WARNING):
        report = prune(model)
    zeros, weights = layer_matrices(model)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)  # of the targeted weights
    assert report.coverage < 0.5  # the experts are most of the weights, and they were not pruned
    # what the report says, times what it covers, is what happened to the layers' weights
    assert report.overall_sparsity * report.coverage == pytest.approx(zeros / weights, rel=0.01)
    assert report.unhandled and all(".experts." in name for name in report.unhandled)
    assert "experts" in caplog.text and "stay dense" in caplog.text


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_fused_experts_are_covered(family, caplog):
    model = build(family)
    with caplog.at_level(logging.WARNING):
        report = prune(model)
    zeros, weights = layer_matrices(model)
    assert families.fully_covered(report) and report.routers and "stay dense" not in caplog.text
    assert zeros / weights == pytest.approx(report.overall_sparsity, abs=0.005)


def test_ignoring_the_experts_silences_the_warning(caplog):
    with caplog.at_level(logging.WARNING):
        report = prune(build("llama4_text"), ignore=["*experts*"])
    assert report.unhandled == {} and report.unhandled_note("model.layers") is None
    assert report.coverage < 0.5 and "stay dense" not in caplog.text
    report = prune(build("mixtral"), ignore=["*experts*"])  # pruned experts can be left out on purpose too
    assert report.coverage < 0.5 and not any("experts" in name for name in report.sparsity)


def test_dense_model_is_fully_covered(caplog):
    with caplog.at_level(logging.WARNING):
        report = prune(build("llama"))
    assert report.coverage == 1.0 and families.fully_covered(report) and "stay dense" not in caplog.text
    report = prune(build("llama"), ignore=["*mlp*"])
    assert 0.2 < report.coverage < 0.5  # attention only: ignored on purpose, no warning


def test_cli_and_model_card_state_the_coverage(tmp_path, capsys):
    build("llama4_text").save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    code = main(["--model", str(tmp_path / "moe"), "--method", "wanda", "--sparsity", "0.5", "--dataset",
                 str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress", "--output",
                 str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "of the decoder layers' weights" in captured.out
    assert "warning:" in captured.err and "feed_forward.experts.gate_up_proj" in captured.err
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert results["coverage"] < 0.5 and results["unhandled_weights"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "coverage" in card and "stay dense" in card and "experts" in card
