"""Working memory of one solve, per method: the measured peak against `PruningMethod.workspace_bytes`.

Each (method, rows, cols) runs in its own process: random input statistics (a correlated Gram
matrix over ``--tokens`` tokens) and a random stacked weight are built, the peak-RSS mark is reset
(``/proc/self/clear_refs``), ``prune_linears`` runs once, and the new peak above the memory held
before the solve is the solve's working set. A least-squares fit of that set to
``4 * (a * cols^2 + b * rows * cols)`` gives the float32 copies of the Gram matrix (a) and of the
weight (b) the method holds at its peak, which is what ``workspace_copies`` declares.

    python benchmarks/workspace.py                       # every Gram solver, the default shapes
    python benchmarks/workspace.py --methods alps --shapes 960x576 576x1536
    python benchmarks/workspace.py --shapes 14336x1024 1024x4096 --options alps:max_iter=6
"""

from __future__ import annotations

import argparse
import ast

import torch

from harness import in_process

METHODS = ["magnitude", "wanda", "sparsegpt", "alps", "fista", "sparsefw"]
# stacked rows x input width: SmolLM2's q/k/v, gate/up and down, and wider ones
SHAPES = ["960x576", "3072x576", "576x1536", "1536x1024", "1024x2048"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _measure(method_name: str, options: dict, rows: int, cols: int, tokens: int, queue) -> None:
    try:
        queue.put(_solve_peak(method_name, options, rows, cols, tokens))
    except BaseException as error:  # the parent waits on the queue: always answer
        queue.put(error)
        raise


def _solve_peak(method_name: str, options: dict, rows: int, cols: int, tokens: int) -> int:
    import gc

    from optimum_prune.calibration.statistics import InputStatistics
    from optimum_prune.patterns import SparsityPattern, Target
    from optimum_prune.registry import get_method

    torch.set_num_threads(1)
    cls = get_method(method_name)
    method = cls(cls.parse_options(options))
    generator = torch.Generator().manual_seed(0)
    stats = InputStatistics(cols, method.statistics | {"sq_norm"})
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    for start in range(0, tokens, 1024):
        stats.update(torch.randn(min(1024, tokens - start), cols, generator=generator) @ mixing)
    weight = torch.randn(rows, cols, generator=generator) / cols**0.5
    del mixing
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    method.prune_linears([weight], stats, Target(0.5, SparsityPattern.parse("unstructured")))
    return (_status_kb("VmHWM") - before) * 1024


def measure(method: str, options: dict, rows: int, cols: int, tokens: int) -> int:
    result = in_process(_measure, method, options, rows, cols, tokens)
    if isinstance(result, BaseException):
        raise result
    return result


def fit_copies(points: list[tuple[int, int, int]]) -> tuple[float, float]:
    """Non-negative least squares of bytes = 4 (a c^2 + b r c) over (rows, cols, bytes) points."""
    A = torch.tensor([[4.0 * c * c, 4.0 * r * c] for r, c, _ in points], dtype=torch.float64)
    y = torch.tensor([float(b) for _, _, b in points], dtype=torch.float64)
    scale = A.abs().amax(0)
    best = None
    for columns in ([0, 1], [0], [1]):  # the unconstrained fit, or one term alone if a copy count is negative
        coef = torch.linalg.lstsq(A[:, columns] / scale[columns], y.unsqueeze(1)).solution.squeeze(1) / scale[columns]
        if (coef >= 0).all():
            full = torch.zeros(2, dtype=torch.float64)
            full[columns] = coef
            error = float((A @ full - y).norm())
            if best is None or error < best[0]:
                best = (error, full)
    return tuple(float(v) for v in best[1])


def main(argv=None):
    from optimum_prune.registry import get_method

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--options", nargs="*", default=[], metavar="METHOD:KEY=VALUE,...",
                        help="method options, e.g. alps:max_iter=6 to bound the time of wide shapes "
                             "(the working set is reached in the first iterations)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.options:
        name, _, pairs = item.partition(":")
        options[name] = {k: ast.literal_eval(v) for k, _, v in (p.partition("=") for p in pairs.split(",") if p)}
    print("| method | rows x cols | measured MB | declared MB | declared / measured |")
    print("|---|---|---|---|---|")
    for name in args.methods:
        method = get_method(name)()
        points = []
        for shape in args.shapes:
            rows, cols = map(int, shape.split("x"))
            measured = measure(name, options.get(name, {}), rows, cols, args.tokens)
            declared = method.workspace_bytes(rows, cols)
            points.append((rows, cols, measured))
            print(f"| {name} | {rows} x {cols} | {measured / 2**20:.1f} | {declared / 2**20:.1f} | "
                  f"{declared / max(measured, 1):.2f} |", flush=True)
        grams, weights = fit_copies(points)
        print(f"| {name} | fit | copies of the Gram matrix {grams:.2f}, of the weight {weights:.2f} | "
              f"declared {method.workspace_copies} | |", flush=True)


if __name__ == "__main__":
    main()
