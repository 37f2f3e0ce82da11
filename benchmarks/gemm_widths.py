"""Why structured widths are rounded (``channel_multiple``): time of an MLP-sized up + down projection
pair (2048 tokens, hidden 576 as in SmolLM2-135M) for several intermediate widths on this machine.

    python benchmarks/gemm_widths.py
"""

from __future__ import annotations

import time

import torch


def main(widths=(1536, 1280, 1229, 1216, 1152, 922, 928, 896, 768), tokens=2048, hidden=576, repeats=20):
    x = torch.randn(tokens, hidden)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| width | ms (up + down) | GFLOP/s |\n|---|---|---|")
    for width in widths:
        up, down = torch.randn(width, hidden), torch.randn(hidden, width)
        for _ in range(3):
            torch.nn.functional.linear(torch.nn.functional.linear(x, up), down)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(torch.nn.functional.linear(x, up), down)
        seconds = (time.perf_counter() - start) / repeats
        print(f"| {width} | {seconds * 1000:.2f} | {4 * tokens * hidden * width / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
