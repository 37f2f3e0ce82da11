"""MoE statistics in expert chunks (issue #42): when the per-expert statistics of a MoE layer do
not fit in the memory a device offers, the memory plan collects them for a few experts per pass
(the other experts' inputs do not depend on them) — the same weights as one pass, the statistics
held at once within what the budget leaves for them, and the plan-only run showing the chunks."""

from __future__ import annotations

import weakref

import pytest
import torch
import transformers
from families import FAMILIES

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.calibration import capture
from optimum_prune.engine import resources
from optimum_prune.engine.build import build_engine


def moe(family: str, experts: int = 8):
    config = FAMILIES[family]()
    setattr(config, "n_routed_experts" if family == "deepseek_v3" else "num_experts", experts)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def config(method: str) -> PruningConfig:
    structured = method == "fasp"
    return PruningConfig(method=method, pattern="structured" if structured else "unstructured",
                         sparsity=0.25 if structured else 0.5, num_calibration_samples=8, seqlen=32, batch_size=2,
                         channel_multiple=1)


def budget_for(model, cfg: PruningConfig, experts_per_pass: float) -> tuple[int, int]:
    """(bytes the prune may use on the CPU so that ``experts_per_pass`` experts' statistics fit beside
    the rest of the largest MoE layer, the bytes left for those statistics)."""
    pruner = Pruner(cfg)
    engine = build_engine(model, cfg, pruner.method)
    act = resources.activation_bytes(engine, 8, 32, torch.device("cpu")).get("cpu", 0)
    found = [resources.layer_parts(engine, i, 8, 32) for i in range(len(engine.layers))]
    rest, per_expert = max((sum(parts.values()) + act, per) for _, parts, (_, per) in filter(None, found))
    return int(rest + experts_per_pass * per_expert), int(experts_per_pass * per_expert)


@pytest.mark.parametrize("family,method", [("qwen3_moe", "sparsegpt"), ("deepseek_v3", "sparsegpt"),
                                           ("qwen3_moe", "fasp")])
def test_chunked_statistics_give_the_weights_of_one_pass(monkeypatch, family, method):
    cfg = config(method)
    whole = moe(family)
    Pruner(cfg).prune(whole, ids(), progress=False)

    chunked = moe(family)
    budget, room = budget_for(chunked, cfg, 2.5)  # 2 of 8 experts per pass: 4 passes per MoE layer
    monkeypatch.setattr(resources, "available_bytes", lambda device: budget)
    alive, peak, passes = weakref.WeakSet(), [0], []
    original = capture.ExpertCollector.__init__

    def counted(self, banks, kinds, device, all_tokens=False, experts=None):
        original(self, banks, kinds, device, all_tokens, experts)
        passes.append(experts)
        for found in self.stats.values():
            alive.update(s for s in found if s is not None)
        held = sum(s.gram_sum.numel() * s.gram_sum.element_size() for s in alive if s.gram_sum is not None)
        peak[0] = max(peak[0], held)

    monkeypatch.setattr(capture.ExpertCollector, "__init__", counted)
    pruner = Pruner(cfg)
    pruner.prune(chunked, ids(), progress=False)
    assert pruner.engine.expert_chunk == 2
    assert [(c.start, c.stop) for c in passes[:4]] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert len(passes) == 4 * len(chunked.model.layers)
    assert 0 < peak[0] <= room  # the statistics held at once: one chunk's, within what the budget leaves
    expected = whole.state_dict()
    for key, value in chunked.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_one_pass_when_the_experts_fit(monkeypatch):
    cfg = config("sparsegpt")
    model = moe("qwen3_moe")
    budget, _ = budget_for(model, cfg, 8)
    monkeypatch.setattr(resources, "available_bytes", lambda device: budget)
    pruner = Pruner(cfg)
    pruner.prune(model, ids(), progress=False)
    assert pruner.engine.expert_chunk is None


def test_not_even_one_expert_fits_is_one_line_before_any_work(monkeypatch):
    cfg = config("sparsegpt")
    model = moe("qwen3_moe")
    budget, _ = budget_for(model, cfg, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(resources, "available_bytes", lambda device: budget)
    with pytest.raises(PruningError, match="Not even one expert's statistics"):
        Pruner(cfg).prune(model, ids(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plan_shows_the_chunks_their_passes_and_the_process_share(monkeypatch):
    cfg = config("sparsegpt")
    model = moe("qwen3_moe")
    budget, _ = budget_for(model, cfg, 2.5)
    single = Pruner(cfg).plan(model, processes=1)
    monkeypatch.setattr(resources, "available_bytes", lambda device: budget)
    plan = Pruner(cfg).plan(model, processes=2)
    assert plan.expert_chunk == (2, 8, 4) and single.expert_chunk is None
    text = plan.describe()
    assert "2 of 8 experts per pass, 4 statistics passes per MoE layer" in text
    assert "2 processes" in text and 0.5 <= plan.solve_share < 0.75
    assert plan.working.total("cpu") <= budget  # the plan fits what it was offered
    assert plan.flops["statistics"] > single.flops["statistics"] / 2  # the extra passes are counted
    assert plan.flops["solve"] < single.flops["solve"]  # the busiest process solves a share
