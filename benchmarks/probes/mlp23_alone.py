"""Diagnostic probe of the seed-2 break of the combined policy-gradient search (docs/results/README.md,
'Policy gradient over channels and blocks'); run from the repository root: python benchmarks/probes/mlp23_alone.py"""
import sys, torch
sys.path.insert(0, "benchmarks")
from harness import load_fp32
from texts import perplexities
from optimum_prune.assets import smollm2_checkpoint
from optimum_prune.structure.shrink import remove_blocks
model, tok = load_fp32(smollm2_checkpoint())
print("dense", perplexities(model, tok, 512, 8))
remove_blocks(model, [(23, "mlp")])
print("no mlp 23", perplexities(model, tok, 512, 8))
