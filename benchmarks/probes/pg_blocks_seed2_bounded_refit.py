"""Diagnostic probe of the seed-2 break (docs/results/README.md, 'Policy gradient over channels and blocks'):
the saved model and decision of `pg_blocks_seed2_restore.py` (WORK/model, WORK/checkpoint), the named layers'
`down_proj` re-fitted by least squares with the damping raised until the re-fit's Frobenius norm is no larger
than the dense consumer's (a bounded re-fit instead of the kept columns), perplexity on 8 windows after each.
Run from the repository root (about 9 minutes alone):

    python benchmarks/probes/pg_blocks_seed2_bounded_refit.py WORK_FOLDER 28 2 0
"""
import glob, os, sys, torch
from safetensors.torch import load_file
sys.path.insert(0, "benchmarks")
from harness import load_fp32
from texts import perplexities
from optimum_prune.assets import smollm2_checkpoint
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.methods.linalg import restore_columns
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
_, tok = load_fp32(smollm2_checkpoint())
windows = calibration_windows("packaged:wiki-leads", tok, 64, 512, 2)
pruned = AutoModelForCausalLM.from_pretrained(os.path.join(sys.argv[1], "model"), dtype=torch.float32).eval()
dense = {}
for p in glob.glob(os.path.join(smollm2_checkpoint(), "*.safetensors")): dense.update(load_file(p))
dec = load_file(os.path.join(sys.argv[1], "checkpoint", "decision.safetensors"))
def inputs(layer):
    found = []
    h = pruned.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: found.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        for i in range(0, 64, 4): pruned(windows[i:i+4])
    h.remove()
    return torch.cat(found)
def bounded(W, gram, keep, damp=0.01):
    bound = W.norm()
    X = restore_columns(W, gram, keep, damp)
    if X.norm() <= bound: return X, damp
    lo, hi = damp, damp
    while True:
        hi *= 4; X = restore_columns(W, gram, keep, hi)
        if X.norm() <= bound: break
    for _ in range(30):
        mid = (lo*hi) ** 0.5
        if restore_columns(W, gram, keep, mid).norm() <= bound: hi = mid
        else: lo = mid
    return restore_columns(W, gram, keep, hi), hi
print("as saved", perplexities(pruned, tok, 512, 8), flush=True)
for layer in [int(a) for a in sys.argv[2:]]:
    p = f"model.layers.{layer}.mlp."
    gate, up, down = (dense[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    x = inputs(layer)
    z = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    gram = (z.T.double() @ z.double() / z.shape[0]).float()
    keep = dec[f"keep.{2*layer+1}"].nonzero().squeeze(1)
    X, damp = bounded(down, gram, keep)
    print(layer, "damping", damp, "max", float(X.abs().max()), "fro ratio", float(X.norm()/down.norm()), flush=True)
    with torch.no_grad(): pruned.model.layers[layer].mlp.down_proj.weight.copy_(X)
    print("after layer", layer, perplexities(pruned, tok, 512, 8), flush=True)
