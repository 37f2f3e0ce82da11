"""How well the plan's matmul-rate sample predicts the rate that follows it (docs/results/scaling.md).

Each trial takes the plan's sample (`engine.cost.gemm_rate`: one 0.25 s run of 1024 x 1024
products) and the median of five bursts over 0.5 s (``bursts=5``, the alternative tried), then times ``--sustained`` seconds of 2048 x 2048 products
(the long work a prune does at that rate); printed: each sample over the sustained rate, and over all
trials the spread (standard deviation of the log ratio) of each. Run it alone: a benchmark beside it
measures nothing.

    python benchmarks/gemm_rate.py --trials 6 --sustained 5
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from optimum_prune.engine.cost import gemm_rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--sustained", type=float, default=5.0, help="seconds of products after each sample")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    ratios = {"median of 5 bursts, 0.5 s": [], "one 0.25 s sample": []}
    print("| trial | median of 5 bursts GFLOP/s | one 0.25 s sample GFLOP/s | sustained GFLOP/s | "
          "bursts / sustained | one sample / sustained |\n|---|---|---|---|---|---|")
    for trial in range(args.trials):
        median = gemm_rate(cpu, seconds=0.5, bursts=5)
        single = gemm_rate(cpu)
        sustained = gemm_rate(cpu, size=2048, seconds=args.sustained)
        ratios["median of 5 bursts, 0.5 s"].append(median / sustained)
        ratios["one 0.25 s sample"].append(single / sustained)
        print(f"| {trial} | {median / 1e9:.1f} | {single / 1e9:.1f} | {sustained / 1e9:.1f} | "
              f"{median / sustained:.3f} | {single / sustained:.3f} |", flush=True)
    for name, values in ratios.items():
        logs = [math.log(v) for v in values]
        print(f"{name}: sample / sustained {min(values):.3f}-{max(values):.3f}, mean {statistics.mean(values):.3f}, "
              f"sd of log {statistics.stdev(logs):.3f}")


if __name__ == "__main__":
    main()
