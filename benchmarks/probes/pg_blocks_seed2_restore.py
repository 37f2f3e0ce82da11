"""Diagnostic probe of the seed-2 break of the combined policy-gradient search (docs/results/README.md,
'Policy gradient over channels and blocks'): the decision kept in a checkpoint, the pruned model saved,
then layer 28's MLP examined: how much of its output each channel carries (on calibration windows the
least squares did not see), whether the decision removed the dominant one, and what the least-squares
restoration makes of it at several dampings. Run from the repository root (about 10 minutes alone):

    python benchmarks/probes/pg_blocks_seed2_restore.py [WORK_FOLDER]
"""
import glob
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, "benchmarks")
from harness import load_fp32  # noqa: E402
from texts import perplexities  # noqa: E402

from optimum_prune import Pruner, PruningConfig  # noqa: E402
from optimum_prune.assets import smollm2_checkpoint  # noqa: E402
from optimum_prune.calibration.data import calibration_windows  # noqa: E402
from optimum_prune.methods.linalg import restore_columns  # noqa: E402

work = sys.argv[1] if len(sys.argv) > 1 else os.path.join("outputs", "probes", "pg-seed2")
checkpoint, saved = os.path.join(work, "checkpoint"), os.path.join(work, "model")
model, tok = load_fp32(smollm2_checkpoint())
windows = calibration_windows("packaged:wiki-leads", tok, 64, 512, 2)
if not os.path.isdir(saved):
    pruner = Pruner(PruningConfig(method="policy_gradient", pattern="structured", sparsity=0.2, seed=2,
                                  method_kwargs={"blocks": "block"}, num_calibration_samples=64, seqlen=512))
    pruner.prune(model, windows, progress=False, checkpoint_dir=checkpoint)  # its decision stays in the folder
    print("removed", pruner.report.removed_blocks, "ppl (8 windows)", perplexities(model, tok, 512, 8), flush=True)
    pruner.save_pretrained(saved, tokenizer=tok)
from transformers import AutoModelForCausalLM  # noqa: E402

pruned = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
dense = {}
for path in glob.glob(os.path.join(smollm2_checkpoint(), "*.safetensors")):
    dense.update(load_file(path))
keep = load_file(os.path.join(checkpoint, "decision.safetensors"))["keep.57"].nonzero().squeeze(1)  # layer 28's MLP
prefix = "model.layers.28.mlp."
gate, up, down = (dense[prefix + name + ".weight"] for name in ("gate_proj", "up_proj", "down_proj"))


def mlp_inputs(first, last):
    """The dense layer-28 MLP's intermediate activations on the pruned model's inputs to it."""
    found = []
    hook = pruned.model.layers[28].mlp.register_forward_pre_hook(lambda module, args: found.append(args[0].flatten(0, 1)))
    with torch.no_grad():
        for i in range(first, last, 4):
            pruned(windows[i:i + 4])
    hook.remove()
    x = torch.cat(found)
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


fit, held = mlp_inputs(0, 32), mlp_inputs(48, 64)
gram = (fit.T.double() @ fit.double() / fit.shape[0]).float()
target = held @ down.T
share = [float((held[:, j:j + 1] @ down[:, j:j + 1].T).norm() / target.norm()) for j in range(down.shape[1])]
top = sorted(range(len(share)), key=lambda j: -share[j])[:5]
removed = set(range(down.shape[1])) - set(keep.tolist())
print("channels carrying most of the output (share of its norm alone, removed?):",
      [(j, round(share[j], 3), j in removed) for j in top])
print("saved down_proj max |w|", float(pruned.model.layers[28].mlp.down_proj.weight.detach().abs().max()),
      "dense", float(down.abs().max()))
print("held-out relative error, kept columns sliced, no restoration:",
      float((held[:, keep] @ down[:, keep].T - target).norm() / target.norm()))
for damping in (0.01, 0.1, 0.3):
    restored = restore_columns(down, gram, keep, damping)
    print(f"damping {damping}: restored max |w| {float(restored.abs().max()):.1f}, held-out relative error "
          f"{float((held[:, keep] @ restored.T - target).norm() / target.norm()):.3f}")
