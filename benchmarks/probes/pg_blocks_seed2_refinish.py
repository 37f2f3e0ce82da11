"""The seed-2 break of policy gradient + block gates, finished again at the current commit from the
search decision that `pg_blocks_seed2_restore.py` committed (WORK/checkpoint): the search is not run
again, only the layer-wise finish (with the default ``max_restore_growth``, or the ratio given). Prints
which consumers were re-fitted and which kept the dense columns of their kept units, and the perplexity
on 64 x 512 windows of each text; with ROWS, appends the row in `benchmarks/depth.py`'s format. Run from
the repository root (about 8 minutes alone):

    python benchmarks/probes/pg_blocks_seed2_refinish.py [WORK_FOLDER] [ROWS] [--growth R|none]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, "benchmarks")
from harness import load_fp32  # noqa: E402
from texts import perplexities  # noqa: E402

from optimum_prune import Pruner, PruningConfig  # noqa: E402
from optimum_prune.assets import smollm2_checkpoint  # noqa: E402
from optimum_prune.calibration.data import calibration_windows  # noqa: E402
from optimum_prune.engine.checkpoint import fingerprint  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("work", nargs="?", default=os.path.join("outputs", "probes", "pg-seed2"))
parser.add_argument("rows", nargs="?")
parser.add_argument("--growth", default=None, help="max_restore_growth (default: the method's default)")
args = parser.parse_args()
options = {"blocks": "block"}  # the configuration the decision was committed under (its fingerprint)
if args.growth is not None:
    options["max_restore_growth"] = None if args.growth == "none" else float(args.growth)
growth = "" if args.growth is None else f",max_restore_growth={'null' if args.growth == 'none' else float(args.growth)}"
spec = f'policy_gradient[blocks="block"{growth}]:s0.2'  # the row's name says the ratio it was finished under
model, tok = load_fp32(smollm2_checkpoint())
dense = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("down_proj.weight", "o_proj.weight"))}
windows = calibration_windows("packaged:wiki-leads", tok, 64, 512, 2)
with tempfile.TemporaryDirectory() as tmp:
    checkpoint = os.path.join(tmp, "checkpoint")
    shutil.copytree(os.path.join(args.work, "checkpoint"), checkpoint, ignore=shutil.ignore_patterns("finish"))
    decision = load_file(os.path.join(checkpoint, "decision.safetensors"))
    start = time.perf_counter()
    config = PruningConfig(method="policy_gradient", pattern="structured", sparsity=0.2, seed=2,
                           method_kwargs=options, num_calibration_samples=64, seqlen=512)
    if args.growth is not None:  # the search does not read max_restore_growth: the copy is marked as this config's
        state_file = os.path.join(checkpoint, "checkpoint.json")
        with open(state_file) as f:
            state = json.load(f)
        state["fingerprint"]["config"] = fingerprint(model, config, windows)["config"]
        with open(state_file, "w") as f:
            json.dump(state, f)
    pruner = Pruner(config)
    pruner.prune(model, windows, progress=False, checkpoint_dir=checkpoint, resume=True)
seconds = time.perf_counter() - start
print("finish", round(seconds), "s; removed", pruner.report.removed_blocks, flush=True)
for name, weight in model.named_parameters():
    if name in dense and weight.shape != dense[name].shape:  # a consumer that lost units (layers keep their index)
        layer = int(name.split(".")[2])
        keep = decision[f"keep.{2 * layer + name.endswith('down_proj.weight')}"]
        cols = keep.repeat_interleave(dense[name].shape[1] // keep.numel())
        kind = "kept columns" if torch.equal(weight.detach(), dense[name][:, cols]) else "re-fitted"
        print(f"  {name}: {kind}, Frobenius norm {float(weight.norm() / dense[name].norm()):.3f}x dense")
ppl = perplexities(model, tok, 512, 64)
print("perplexity (64 windows)", ppl, flush=True)
if args.rows:
    row = {"key": f"{spec}:2", "spec": spec, "seed": 2, "prune_s": seconds,
           "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
           "removed_layers": pruner.report.removed_layers, "removed_blocks": pruner.report.removed_blocks,
           "unit_scores": pruner.report.unit_scores, "sparsity": pruner.report.overall_sparsity, "ppl": ppl,
           "note": "the search decision committed by pg_blocks_seed2_restore.py, finished again (prune_s: the finish)"}
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")
