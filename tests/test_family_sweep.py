"""Every family prunes or refuses in one line, and coverage counts every matrix (issue #40, classes
1 and 2). The families and their tiny models come from tests/family_sweep.py (transformers' own
auto mapping); CI prunes a fixed sample of them, the full sweep is ``python tests/family_sweep.py``
and its table in docs/architectures.md must list every family of the installed transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_texts, make_tokenizer
from family_sweep import causal_lm_families, decoder_matrices, documented_families, sweep_row, tiny_model
from test_safety import one_line_exit_2, run_cli

from optimum_prune import Pruner, PruningConfig
from optimum_prune.commands.prune import main  # noqa: F401 - run_cli's entry point


# families that prune (dense, MoE with routers, hybrid recurrent), refuse structured or everything,
# and the ones the adversarial pass found crashing (recurrent_gemma) or miscounted (gemma4_text)
SAMPLE = ["llama", "qwen2_moe", "deepseek_v3", "recurrent_gemma", "gemma4_text", "jamba", "mamba", "gpt2", "bloom",
          "phimoe"]


def test_the_committed_table_lists_every_family():
    assert documented_families() == causal_lm_families(), \
        "docs/architectures.md's sweep is stale: run `python tests/family_sweep.py`"


@pytest.mark.parametrize("family", SAMPLE)
def test_1_a_family_prunes_truthfully_or_refuses_in_one_line(family):
    row = sweep_row(family)
    assert row["built"] == "yes", row
    for method in ("sparsegpt", "fasp"):
        assert row[method] in ("pruned", "refused"), (method, row)
        assert "\n" not in row[f"{method}_detail"]


def test_1_recurrent_gemma_is_calibrated_layer_by_layer():
    """Its decoder layers take position_ids and the mask positionally: a TypeError from inside its
    forward before; the first layer's positional inputs are now kept by name."""
    row = sweep_row("recurrent_gemma")
    assert row["sparsegpt"] == "pruned", row


def test_1_a_refused_family_is_one_line_and_exit_2(tmp_path, capsys):
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(20)))
    code, err = run_cli(["--model", tmp_path / "gpt2", "--method", "fasp", "--pattern", "structured", "--sparsity",
                         "0.2", "--dataset", tmp_path / "calib.txt", "--num-samples", "2", "--seqlen", "32",
                         "--no-progress", "--output", tmp_path / "out"], capsys)
    one_line_exit_2(code, err, "Structured pruning cannot shrink architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gemma4_text", "qwen2_moe", "recurrent_gemma"])
def test_2_coverage_counts_every_matrix_and_names_each_left_out(family):
    """Every matrix-shaped parameter of the decoder layers is pruned, or named: routers and gates
    (on purpose), left out by the config, or unhandled. Gemma 4's ``per_layer_input_gate`` (a
    projection, not a router) was skipped from the count before: coverage 1.0, left dense, no word."""
    model = tiny_model(family)
    matrices = decoder_matrices(model)
    pruner = Pruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=4, seqlen=32))
    pruner.prune(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), progress=False)
    report = pruner.report
    total = sum(p.numel() for p in matrices.values())
    named = sum(report.unhandled.values()) + sum(report.routers.values()) + sum(report.ignored.values())
    assert report.layer_weights == total and report.covered_weights + named == total
    zeros = sum(int((p == 0).sum()) for p in matrices.values())
    assert report.overall_sparsity * report.coverage == pytest.approx(zeros / total, abs=0.01)
    if family == "gemma4_text":
        assert any("per_layer_input_gate" in name for name in report.sparsity)  # pruned like any projection
    if family == "qwen2_moe":
        assert {name.rsplit(".", 1)[0].split(".", 3)[-1] for name in report.routers} == {"mlp.gate",
                                                                                          "mlp.shared_expert_gate"}
    if family == "recurrent_gemma":
        assert report.unhandled and all("temporal_block" in name for name in report.unhandled)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2", "recurrent_gemma", "gemma4_text", "qwen2_moe"])
def test_1_each_layer_gets_the_inputs_the_model_gives_it(family):
    """Run layer by layer from the captured inputs, every decoder layer computes what it computes
    inside the model. Gemma 3's full-attention layers (every 6th) take global rotary embeddings
    and Gemma 4's layers each their own slice of the per-layer inputs: the arguments of layer 0,
    reused for every layer before, gave them the wrong ones."""
    import transformers

    from optimum_prune.engine.activations import ActivationStore
    from optimum_prune.engine.passes import capture_layer_inputs, run_layer
    from optimum_prune.structure.layers import find_decoder_layers

    if family == "gemma3_text":  # seven layers: five sliding-window ones, a full-attention one, a sliding one
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, max_position_embeddings=256, sliding_window=8)).eval()
    else:
        model = tiny_model(family)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        _, layers = find_decoder_layers(model)
        inputs, kwargs = capture_layer_inputs(model, layers, ids, 2, ActivationStore("device"))
        for index, layer in enumerate(layers[:-1]):
            inputs = run_layer(layer, inputs, kwargs[index], torch.device("cpu"))
            got = torch.cat(list(inputs))
            assert torch.allclose(got, expected[index + 1], atol=1e-5), f"layer {index}"
