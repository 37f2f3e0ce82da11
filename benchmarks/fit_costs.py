"""Refit the time model's per-weight constants to the measured scaling rows.

`Pruner.plan` counts each method's solve in matmul operations (`PruningMethod.solve_flops`).
Most of a solve is products with the Gram matrix, counted exactly; the memory-bound rest
(selections, element-wise updates) is counted as a constant number of operations per weight:
`SELECTION_OPS` (one score-and-select pass, `methods.base`), `SWEEP_OPS` (SparseGPT's column sweep),
`FISTA_STEP_OPS` and `FW_STEP_OPS` (one FISTA / Frank-Wolfe iteration). This script recovers those
constants from the rows `benchmarks/scaling.py` measured: for every row it makes the plan's solve count
with every constant at 0 (the exact part, ``b``) and with each one at 1 alone (its coefficient, ``a_i``),
on a model built on the meta device (no weights), and fits ``solve seconds x row's matmul rate =
b + sum_i c_i a_i`` by non-negative least squares on relative errors, so that a 576-wide row counts as
much as a 4096-wide one. It prints the fitted and the declared constants and, per row, the estimate /
measured solve with each.

    python benchmarks/fit_costs.py                                   # the rows in docs/results
    python benchmarks/fit_costs.py --rows rows.jsonl --methods magnitude wanda sparsegpt
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import pkgutil

import numpy as np
import torch

from harness import parser as harness_parser

from scaling import build_model, row_config

CONSTANTS = ("SELECTION_OPS", "SWEEP_OPS", "FISTA_STEP_OPS", "FW_STEP_OPS")
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "fista", "sparsefw")


@functools.cache
def holders(name: str) -> tuple:
    """The modules of `optimum_prune.methods` that hold the constant ``name`` (``from .base import``
    copies the value, so each copy is set)."""
    import optimum_prune.methods as package

    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    return tuple(module for module in modules if hasattr(module, name))


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||a x - y|| over x >= 0, exactly, for the few columns here: the best unconstrained fit
    on each subset of the columns whose solution is non-negative."""
    best, best_error = np.zeros(a.shape[1]), float(np.sum(y**2))
    for size in range(1, a.shape[1] + 1):
        for subset in map(list, itertools.combinations(range(a.shape[1]), size)):
            x = np.zeros(a.shape[1])
            x[subset] = np.linalg.lstsq(a[:, subset], y, rcond=None)[0]
            error = float(np.sum((a @ x - y) ** 2))
            if (x >= 0).all() and error < best_error:
                best, best_error = x, error
    return best


def solve_count(model, config, values: dict[str, float]) -> float:
    """The plan's solve operations for ``model`` pruned with ``config``, the constants set to ``values``."""
    from optimum_prune import Pruner

    saved = {}
    for name, value in values.items():
        for module in holders(name):
            saved[(module, name)] = getattr(module, name)
            setattr(module, name, value)
    try:
        return Pruner(config).plan(model, num_windows=config.num_calibration_samples).flops["solve"]
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def main(argv=None):
    parser = harness_parser(__doc__, seqlen=256)
    here = os.path.dirname(__file__)
    parser.add_argument("--rows", default=os.path.join(here, "..", "docs", "results", "scaling-rows.jsonl"))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--skip", nargs="*", default=["sparsefw:0.5"],
                        help="row specs listed but left out of the fit (default: the full SparseFW rows, which stop "
                             "on a duality gap that random layers close in ~200 iterations where the count assumes "
                             "the 55 of real ones)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of the rows (scaling.py's)")
    args = parser.parse_args(argv)

    with open(args.rows, encoding="utf-8") as handle:
        rows = [r for r in map(json.loads, filter(str.strip, handle))
                if "error" not in r and r["method"] in args.methods and r["phases"].get("solve")]
    if not rows:
        raise SystemExit(f"no measured rows of {args.methods} in {args.rows}")
    declared = {name: getattr(holders(name)[0], name) for name in CONSTANTS}
    zero = dict.fromkeys(CONSTANTS, 0.0)
    exact, coefficients, measured = [], [], []
    for row in rows:
        with torch.device("meta"):  # no weights: the counts need only the shapes
            model = build_model(row["shape"], 1)
        config = row_config(argparse.Namespace(samples=args.samples, seqlen=args.seqlen, batch_size=4), row["spec"])
        base = solve_count(model, config, zero)
        exact.append(base)
        coefficients.append([solve_count(model, config, {**zero, name: 1.0}) - base for name in CONSTANTS])
        measured.append(row["phases"]["solve"] * row["gemm_gflops"] * 1e9)  # seconds x the row's own rate
    b, a, y = np.array(exact), np.array(coefficients), np.array(measured)
    fit_rows = np.array([row["spec"] not in args.skip for row in rows])
    used = a[fit_rows].any(axis=0)  # constants the fitted rows' counts contain
    fitted = np.zeros(len(CONSTANTS))
    fitted[used] = nnls(a[fit_rows][:, used] / y[fit_rows, None], (y[fit_rows] - b[fit_rows]) / y[fit_rows])

    print("| constant | declared | fitted |\n|---|---|---|")
    for name, value, on in zip(CONSTANTS, fitted, used):
        print(f"| `{name}` | {declared[name]:.0f} | {f'{value:.0f}' if on else '- (not in these rows)'} |")
    declared_vector = np.array([declared[name] for name in CONSTANTS])
    print("\n| shape | method | measured solve s | estimate / measured, declared | fitted |\n|---|---|---|---|---|")
    for row, bi, ai, yi, fitted_on in zip(rows, b, a, y, fit_rows):
        print(f"| {row['shape']} | {row['spec']}{'' if fitted_on else ' (not fitted)'} | {row['phases']['solve']:.2f} | "
              f"{(bi + ai @ declared_vector) / yi:.2f} | {(bi + ai @ fitted) / yi:.2f} |")
    for label, vector in (("declared", declared_vector), ("fitted", fitted)):
        ratios = ((b + a @ vector) / y)[fit_rows]
        print(f"\n{label}, fitted rows: estimate / measured {ratios.min():.2f}-{ratios.max():.2f}, "
              f"median {np.median(ratios):.2f}, rms log error {np.sqrt(np.mean(np.log(ratios) ** 2)):.2f}")


if __name__ == "__main__":
    main()
