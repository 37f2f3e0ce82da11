"""`Pruner.plan`'s estimates for SmolLM2-135M (fp32, 64 x 512 tokens), loaded as the benchmarks load
it, for comparison with the measured rows of docs/results/profiles.md (docs/results/scaling.md);
``--prune METHOD`` also prunes once and prints the measured peak RSS and engine phases.

    python benchmarks/plan_estimates.py
    python benchmarks/plan_estimates.py --prune wanda --sparsity 0.5
"""

from __future__ import annotations

import argparse
import resource

import torch

RUNS = [("wanda", "uniform"), ("wanda", "owl"), ("wanda", "sensitivity"), ("sparsegpt", "uniform"),
        ("sparsegpt", "sensitivity"), ("alps", "uniform"), ("alps", "sensitivity")]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--runs", nargs="+", default=None, metavar="METHOD:PROFILE",
                        help="the configurations to plan (default: %s)" % " ".join(f"{m}:{p}" for m, p in RUNS))
    parser.add_argument("--sensitivity-samples", type=int, default=2)
    parser.add_argument("--prune", default=None, help="also prune with this method and print what it measured")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.assets import smollm2_checkpoint
    from optimum_prune.calibration.data import calibration_windows

    checkpoint = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    runs = [tuple(run.split(":")) for run in args.runs] if args.runs else RUNS
    for method, profile in runs if args.prune is None else [(args.prune, "uniform")]:
        plan = Pruner(PruningConfig(method=method, sparsity=args.sparsity, sparsity_profile=profile,
                                     sensitivity_samples=args.sensitivity_samples)).plan(model)
        print(f"{method} {profile}: peak {plan.peak_bytes['cpu'] / 2**20:.0f} MiB, {plan.seconds:.0f} s "
              f"({', '.join(f'{k} {v / plan.rate:.1f} s' for k, v in plan.flops.items())}; {plan.rate / 1e9:.0f} GFLOP/s)")
    if args.prune:
        windows = calibration_windows("packaged:wiki-leads", AutoTokenizer.from_pretrained(checkpoint), 64, 512, 0)
        pruner = Pruner(PruningConfig(method=args.prune, sparsity=args.sparsity))
        pruner.prune(model, windows, progress=False)
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in pruner.report.phase_seconds.items())
        print(f"measured: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, {phases}")


if __name__ == "__main__":
    main()
