"""Diagnostic probe of the seed-2 break of the combined policy-gradient search (docs/results/README.md,
'Policy gradient over channels and blocks'); run from the repository root: python benchmarks/probes/mlp23_then_fasp.py"""
import sys, torch
sys.path.insert(0, "benchmarks")
from harness import load_fp32
from texts import perplexities
from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.assets import smollm2_checkpoint
from optimum_prune.structure.shrink import remove_blocks
model, tok = load_fp32(smollm2_checkpoint())
remove_blocks(model, [(23, "mlp")])
windows = calibration_windows("packaged:wiki-leads", tok, 64, 512, 2)
Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=0.2, seed=2, num_calibration_samples=64, seqlen=512)).prune(model, windows, progress=False)
print("no mlp 23 + fasp", perplexities(model, tok, 512, 8))
