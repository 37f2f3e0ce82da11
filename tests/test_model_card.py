"""Every output folder gets a model card: valid Hub metadata, what was done, how to load it."""

import os

import pytest
from conftest import tiny_model
from huggingface_hub import ModelCard
from test_engine import small_config

from optimum_prune import Pruner
from optimum_prune.model_card import build_model_card


def test_saved_folder_has_a_card_with_valid_metadata(tmp_path, calib_ids):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    ModelCard("---\nlicense: apache-2.0\n---\n# base\n").save(base / "README.md")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    pruner = Pruner(small_config(method="sparsegpt", pattern="2:4"))
    pruner.prune(model, calib_ids, progress=False)
    out = pruner.save_pretrained(tmp_path / "out")
    card = ModelCard.load(os.path.join(out, "README.md"))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparsegpt", "semi-structured-sparsity"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # copied from the base model's card
    assert "base_model" not in data  # a local folder is not a Hub repo id
    assert "`2:4`" in card.text and "measured sparsity | 0.5000" in card.text
    assert "trust_remote_code" not in card.text


def test_hub_base_heterogeneous_model_and_results():
    model = tiny_model("llama")
    model.config.layer_widths = [{"intermediate_size": 64}, {"intermediate_size": 96}]
    config = small_config(method="fasp", pattern="structured", sparsity=0.3, dataset="packaged:wiki-leads")
    results = {"sparsity": 0.3, "parameters_before": 1000, "parameters_after": 700, "perplexity_before": 16.5,
               "perplexity_after": 21.25, "eval": {"dataset": "packaged:wiki-leads-eval", "seqlen": 512, "max_windows": 64}}
    card = build_model_card(model, config, base_model="HuggingFaceTB/SmolLM2-135M", results=results,
                            command="optimum-cli prune --model HuggingFaceTB/SmolLM2-135M --method fasp")
    parsed = ModelCard(str(card))  # round trip through the YAML front matter
    assert parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {"pruned", "fasp", "structured-pruning"} <= set(parsed.data.tags)
    text = parsed.text
    assert "trust_remote_code=True" in text and "1,000 -> 700" in text
    assert "| pruned | 21.250 |" in text and "| SmolLM2-135M (dense) | 16.500 |" in text
    (entry,) = parsed.data.eval_results  # model-index: the pruned model's perplexity
    assert (entry.metric_type, entry.metric_value, entry.dataset_name) == ("perplexity", 21.25, "packaged:wiki-leads-eval")
    assert "optimum-cli prune --model HuggingFaceTB/SmolLM2-135M --method fasp" in text
    assert "8 windows x 32 tokens of `packaged:wiki-leads`" in text


def test_recovery_and_zero_shot_results_in_the_card():
    results = {
        "perplexity_before": 16.5, "perplexity_after": 41.0, "perplexity_recovered": 30.5,
        "eval": {"dataset": "packaged:wiki-leads-eval", "seqlen": 512, "max_windows": 64},
        "zero_shot_before": {"boolq": {"acc": 0.6, "acc_stderr": 0.01}},
        "zero_shot_after": {"boolq": {"acc": 0.55}},
        "zero_shot_recovered": {"boolq": {"acc": 0.58}},
        "zero_shot_settings": {"tasks": ["boolq"], "num_fewshot": 0, "limit": 200},
        "recovery": {"method": "lora", "steps": 100, "lr": 2e-4, "rank": 8, "alpha": 16, "batch_size": 4, "seed": 0,
                     "weight_decay": 0.0, "loss_first": 3.2, "loss_last": 2.9, "windows": 256, "seqlen": 512,
                     "seconds": 321.0},
    }
    card = build_model_card(tiny_model("llama"), small_config(method="wanda"), base_model="HuggingFaceTB/SmolLM2-135M",
                            results=results)
    parsed = ModelCard(str(card))
    assert "lora-recovery" in parsed.data.tags
    assert "| pruned + LoRA recovery | 30.500 | 0.5800 (acc) |" in parsed.text
    assert "| pruned | 41.000 | 0.5500 (acc) |" in parsed.text
    assert "trained 100 steps x 4 windows of 512 tokens" in parsed.text and "limit 200" in parsed.text
    reported = {(e.metric_type, e.dataset_name): e.metric_value for e in parsed.data.eval_results}
    assert reported == {("perplexity", "packaged:wiki-leads-eval"): 30.5, ("acc", "boolq"): 0.58}


@pytest.mark.parametrize("pattern, fragment", [("unstructured", "unstructured-sparsity"), ("structured", "structured-pruning")])
def test_python_snippet_when_no_command(pattern, fragment):
    card = build_model_card(tiny_model("llama"), small_config(method="magnitude", pattern=pattern, sparsity=0.25))
    assert fragment in card.data.tags
    assert "PruningConfig.from_pretrained(" in card.text


def test_packaged_base_names_its_hub_origin_and_global_widths():
    """A model pruned from ``packaged:smollm2-135m`` names the Hub repo it comes from (and how the
    packaged copy was made); a heterogeneous structured prune does not claim a uniform share per layer."""
    model = tiny_model("llama")
    model.config.layer_widths = [{"intermediate_size": 64}, {"intermediate_size": 96}]
    config = small_config(method="policy_gradient", pattern="structured", sparsity=0.3,
                          method_kwargs={"budget": "global", "local_method": "spap"})
    parsed = ModelCard(str(build_model_card(model, config, base_model="packaged:smollm2-135m")))
    assert parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parsed.data.model_name == "SmolLM2-135M-Instruct-policy_gradient-pruned"
    text = parsed.text
    assert "[SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) (as packaged" in text
    assert "every decoder layer has its own width" in text and "of every decoder layer's" not in text
    assert '`{"budget": "global", "local_method": "spap"}`' in text
