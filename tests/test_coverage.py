"""The report never overstates (issue #23, first part): it says which share of the decoder layers'
weights the prune targeted, and names the tensors it cannot prune (the fused 3-D expert banks of
transformers 5 mixture-of-experts layers) with a warning, in the report, the CLI and the model card."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from conftest import VOCAB, make_texts, make_tokenizer

from optimum_prune import Pruner, PruningConfig
from optimum_prune.commands.prune import main


SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
MOE = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=128, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=64,
                                                     num_experts=4, num_experts_per_tok=2, head_dim=16),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, intermediate_size=64, num_local_experts=4,
                                                 num_experts_per_tok=2, head_dim=16),
}


def build(config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def layer_matrices(model):
    """(zeros, weights) over the weight matrices of the decoder layers (routers and biases left out)."""
    params = [p for name, p in model.model.layers.named_parameters()
              if p.dim() >= 2 and not name.endswith("bias") and ".mlp.gate." not in name and ".mlp.router." not in name]
    return sum(int((p == 0).sum()) for p in params), sum(p.numel() for p in params)


def prune(model, **config):
    pruner = Pruner(PruningConfig(**{"method": "wanda", "sparsity": 0.5, "num_calibration_samples": 4, "seqlen": 32,
                                     **config}))
    pruner.prune(model, torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0)), progress=False)
    return pruner.report


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_experts_left_dense_are_counted_and_named(family, caplog):
    model = build(MOE[family]())
    with caplog.at_level(logging.WARNING):
        report = prune(model)
    zeros, weights = layer_matrices(model)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)  # of the targeted weights
    assert report.coverage < 0.5  # the experts are most of the weights, and they were not pruned
    # what the report says, times what it covers, is what happened to the layers' weights
    assert report.overall_sparsity * report.coverage == pytest.approx(zeros / weights, rel=0.01)
    assert report.unhandled and all(".experts." in name for name in report.unhandled)
    assert "experts" in caplog.text and "stay dense" in caplog.text


def test_ignoring_the_experts_silences_the_warning(caplog):
    with caplog.at_level(logging.WARNING):
        report = prune(build(MOE["mixtral"]()), ignore=["*experts*"])
    assert report.unhandled == {} and report.unhandled_note("model.layers") is None
    assert report.coverage < 0.5 and "stay dense" not in caplog.text


def test_dense_model_is_fully_covered(caplog):
    with caplog.at_level(logging.WARNING):
        report = prune(build(transformers.LlamaConfig(**SMALL, intermediate_size=128)))
    assert report.coverage == 1.0 and not report.unhandled and "stay dense" not in caplog.text
    report = prune(build(transformers.LlamaConfig(**SMALL, intermediate_size=128)), ignore=["*mlp*"])
    assert 0.2 < report.coverage < 0.5  # attention only: ignored on purpose, no warning


def test_cli_and_model_card_state_the_coverage(tmp_path, capsys):
    build(MOE["mixtral"]()).save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    code = main(["--model", str(tmp_path / "moe"), "--method", "wanda", "--sparsity", "0.5", "--dataset",
                 str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress", "--output",
                 str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "of the decoder layers' weights" in captured.out
    assert "warning:" in captured.err and "mlp.experts.gate_up_proj" in captured.err
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert results["coverage"] < 0.5 and results["unhandled_weights"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "coverage" in card and "stay dense" in card and "experts" in card
