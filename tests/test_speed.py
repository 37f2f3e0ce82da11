"""The speed/size measurement on tiny models (numbers are machine-dependent; only their sanity is tested)."""

from conftest import tiny_model

from optimum_prune import Pruner, PruningConfig
from optimum_prune.evaluation.speed import measure_speed, weight_bytes


def test_measure_speed_reports_sane_numbers(calib_ids):
    dense = tiny_model("llama")
    report = measure_speed(dense, batch_size=2, prompt_length=16, new_tokens=4, repeats=2)
    assert report.parameters == sum(p.numel() for p in dense.parameters())
    assert report.weight_mb * 2**20 == weight_bytes(dense)
    assert report.prefill_tokens_per_s > 0 and report.decode_ms_per_token > 0 and report.peak_memory_mb > 0
    pruned = tiny_model("llama")
    Pruner(PruningConfig(method="magnitude", pattern="structured", sparsity=0.5, channel_multiple=1)).prune(
        pruned, progress=False
    )
    smaller = measure_speed(pruned, batch_size=2, prompt_length=16, new_tokens=4, repeats=2)
    assert smaller.weight_mb < report.weight_mb and smaller.parameters < report.parameters


def test_tied_weights_counted_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() already dedups ties
    assert weight_bytes(model) == unique + sum(b.numel() * b.element_size() for b in model.buffers())
