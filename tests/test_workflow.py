"""`Pruner.run`: the whole workflow from Python (what the CLI runs): load, measure, prune, recover,
measure, save with pruning_results.json and the card; the results returned are the ones saved."""

from __future__ import annotations

import json

import pytest
from conftest import make_texts, make_tokenizer, tiny_model

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.workflow import Evaluation, Recovery


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    tiny_model("llama").save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text("\n\n".join(make_texts(40)))
    (root / "heldout.txt").write_text("\n\n".join(make_texts(20, seed=1)))
    return root


def test_run_measures_prunes_recovers_and_saves(model_dir, tmp_path):
    config = PruningConfig(method="wanda", sparsity=0.5, dataset=str(model_dir / "calib.txt"),
                           num_calibration_samples=4, seqlen=32)
    lines = []
    results = Pruner(config).run(str(model_dir / "tiny"), tmp_path / "out",
                                 evaluation=Evaluation(dataset=str(model_dir / "heldout.txt"), windows=4),
                                 recovery=Recovery(samples=8), echo=lines.append, progress=False)
    saved = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert results["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert results["perplexity_after"] > results["perplexity_before"] > 1
    assert "perplexity_recovered" in results and results["recovery"]["method"] == "lora"
    assert results["eval"] == {"dataset": str(model_dir / "heldout.txt"), "seqlen": 32, "max_windows": 4}
    assert any(line.startswith("pruned ") for line in lines) and lines[-1].startswith("saved to ")
    assert "perplexity" in (tmp_path / "out" / "README.md").read_text()


def test_run_refuses_before_loading(model_dir, tmp_path):
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, seqlen=32)
    with pytest.raises(PruningError, match="--recover trains on text from --dataset"):
        Pruner(config).run(str(model_dir / "missing"), tmp_path / "out", recovery=Recovery(samples=8))
    with pytest.raises(PruningError, match="--device-map"):
        Pruner(config).run(str(model_dir / "missing"), tmp_path / "out", load_kwargs={"max_memory": {0: "1GiB"}})
    with pytest.raises(PruningError, match="--eval-windows"):
        Evaluation(dataset="x", windows=0)
    assert not (tmp_path / "out").exists()
