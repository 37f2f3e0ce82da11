"""SPD inverse from a Cholesky factor on this device: ``torch.cholesky_inverse`` against two
triangular solves with the identity and
``torch.linalg.inv``; time and relative error against a float64 reference (docs/results/scaling.md).

    python benchmarks/inverse.py --sizes 576 1536
"""

from __future__ import annotations

import argparse
import time

import torch

def cholesky_inverse(L):  # two triangular solves against the identity
    return torch.cholesky_solve(torch.eye(L.shape[0], dtype=L.dtype, device=L.device), L)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[576, 1536])
    args = parser.parse_args()
    print("| n | torch.cholesky_inverse s | cholesky_solve(I, L) s | torch.linalg.inv s | error (inverse / solve) |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        torch.manual_seed(0)
        x = torch.randn(4096, n) * torch.rand(n) ** 3
        H = x.T @ x / 4096
        H += 0.01 * H.diagonal().mean() * torch.eye(n)
        L = torch.linalg.cholesky(H)
        times, results = [], []
        for fn in (torch.cholesky_inverse, cholesky_inverse, lambda _: torch.linalg.inv(H)):
            start = time.perf_counter()
            results.append(fn(L))
            times.append(time.perf_counter() - start)
        reference = torch.cholesky_inverse(L.double())
        errors = [float((r.double() - reference).norm() / reference.norm()) for r in results[:2]]
        print(f"| {n} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | {errors[0]:.1e} / {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
