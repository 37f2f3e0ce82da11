"""The GPU path (skipped without CUDA; `benchmarks/gpu_check.sh` runs it on a GPU machine): layers
solved on a CUDA device give the masks the CPU gives (up to float rounding), a model living on
the GPU prunes in place, a structured prune shrinks and reloads with the same logits, fused MoE
experts prune there, and the plan's estimate of the GPU peak is compared with the allocator's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from families import build

from optimum_prune import Pruner, PruningConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def calibration():
    return torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))


def config(method, **kw):
    base = dict(method=method, sparsity=0.5, num_calibration_samples=8, seqlen=32)
    base.update(kw)
    return PruningConfig(**base)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "alps", "fista", "sparsefw"])
def test_layers_solved_on_the_gpu_match_the_cpu(method):
    on_cpu, on_gpu = tiny_model("llama"), tiny_model("llama")
    Pruner(config(method)).prune(on_cpu, calibration(), progress=False)
    pruner = Pruner(config(method))
    pruner.prune(on_gpu, calibration(), progress=False, device="cuda")
    assert pruner.report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    for (name, a), b in zip(on_cpu.named_parameters(), on_gpu.parameters()):
        assert b.device.type == "cpu", name  # each layer went back where it lives
        agree = float(((a == 0) == (b == 0)).float().mean())
        assert agree > 0.97, (name, agree)  # ties and float rounding move a few weights


def test_model_on_the_gpu_prunes_in_place():
    model = tiny_model("llama").cuda()
    pruner = Pruner(config("sparsegpt"))
    pruner.prune(model, calibration(), progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n)
    total = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert zeros / total == pytest.approx(0.5, abs=1e-3)


def test_structured_on_the_gpu_reloads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama").cuda()
    pruner = Pruner(config("fasp", pattern="structured", sparsity=0.25, channel_multiple=1))
    pruner.prune(model, calibration(), progress=False)
    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").cuda().eval()
    ids = calibration()[:64].view(2, 32).cuda()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_fused_experts_prune_on_the_gpu():
    model = build("qwen3_moe").cuda()
    pruner = Pruner(config("sparsegpt"))
    pruner.prune(model, calibration(), progress=False)
    assert pruner.report.expert_matrices > 0 and pruner.report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_plan_estimates_the_gpu_peak():
    """Model in CPU memory, layers solved on the GPU: the plan's estimate of the GPU peak (a layer's
    weights, one batch, statistics, solver) against the allocator's peak, within 1.3x either way."""
    model = tiny_model("llama", hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2)
    cfg = config("sparsegpt", num_calibration_samples=32, seqlen=256)
    plan = Pruner(cfg).plan(model, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    Pruner(cfg).prune(model, torch.randint(0, 256, (32 * 256 * 2,)), progress=False, device="cuda")
    measured = torch.cuda.max_memory_allocated()
    estimated = plan.working.total("cuda")
    assert 1 / 1.3 <= estimated / measured <= 1.3, (estimated, measured, plan.working.describe("cuda"))
