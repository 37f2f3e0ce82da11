"""Diagnostic probe of the seed-2 break of the combined policy-gradient search (docs/results/README.md,
'Policy gradient over channels and blocks'); run from the repository root: python benchmarks/probes/pg_blocks_seed2.py"""
import sys, json, torch
sys.path.insert(0, "benchmarks")
from harness import load_fp32
from texts import perplexities
from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.assets import smollm2_checkpoint
model, tok = load_fp32(smollm2_checkpoint())
windows = calibration_windows("packaged:wiki-leads", tok, 64, 512, 2)
p = Pruner(PruningConfig(method="policy_gradient", pattern="structured", sparsity=0.2, seed=2, method_kwargs={"blocks": "block"}, num_calibration_samples=64, seqlen=512))
p.prune(model, windows, progress=False)
for i, layer in enumerate(model.model.layers):
    mlp = getattr(layer.mlp, "down_proj", None)
    print(i, "attn k_proj out", getattr(getattr(layer.self_attn, "k_proj", None), "out_features", None), "mlp", mlp.in_features if mlp is not None else None)
print("probs", [round(float(v), 2) for v in p.method.gate_probabilities])
print("history", [round(h["loss"], 3) for h in p.engine.history[::20]])
print("ppl", perplexities(model, tok, 512, 8))
