"""Shared solves (issue #42): the solve time of a SmolLM2-135M prune in 1 process against 2
processes sharing each layer's solves, and the weights against 2 processes that each solve
everything (``OPTIMUM_PRUNE_SHARED_SOLVES=0``).

Every run prunes the packaged SmolLM2-135M (float32) on the packaged Wikipedia leads, each process
with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), 2 processes under ``torchrun``
with gloo. ``solve s`` is the engine's solve phase on rank 0 (for 2 processes: its own share, the
wait for the other's and the exchange of the results); the weights' SHA-256 is compared between the
2-process runs (identical weights) and with 1 process (statistics summed in another order: close,
not identical).

    python benchmarks/distributed_solves.py
    python benchmarks/distributed_solves.py --runs alps:0.7 fista:0.7 --resume rows.jsonl
    python benchmarks/distributed_solves.py --device cuda     # one GPU per process (NCCL), 2 GPUs
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

from harness import Rows, command_line, parse_run, parser, write_report

#: (processes, shared) of each measured configuration, in report order
SETUPS = {"1 process": (1, True), "2 processes, shared solves": (2, True),
          "2 processes, each solves everything": (2, False)}


def worker(out: str, run: str, num_samples: int, seqlen: int, device: str = "cpu") -> None:
    """One prune (this process's part of it under torchrun); rank 0 writes the row to ``out``."""
    import torch

    torch.set_num_threads(1)
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.assets import smollm2_checkpoint
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.runtime import distributed

    distributed.init_from_env(device)  # NCCL on GPUs (one per process), gloo on the CPU
    method, options, pattern, sparsity = parse_run(run)
    from harness import load_fp32

    model, tokenizer = load_fp32(smollm2_checkpoint())
    windows = calibration_windows("packaged:wiki-leads", tokenizer, num_samples, seqlen, 0)
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, method_kwargs=options,
                           num_calibration_samples=num_samples, seqlen=seqlen, batch_size=4)
    pruner = Pruner(config)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False, device=None if device == "cpu" else device)
    report = pruner.report
    seconds = time.perf_counter() - start
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    solves = [report.phase_seconds.get("solve", 0.0)]
    if distributed.is_distributed():
        gathered = [None] * distributed.world_size()
        torch.distributed.all_gather_object(gathered, solves[0])
        solves = gathered
    if distributed.is_main_process():
        row = {"prune_s": round(seconds, 2), "solve_s": round(solves[0], 2), "solve_s_per_rank": [round(s, 2) for s in solves],
               "statistics_s": round(report.phase_seconds.get("statistics", 0.0), 2),
               "forward_s": round(report.phase_seconds.get("forward", 0.0), 2),
               "sparsity": round(report.overall_sparsity, 4), "sha256": sha.hexdigest()}
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(row, handle)


def measure(run: str, setup: str, args) -> dict:
    processes, shared = SETUPS[setup]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "OPTIMUM_PRUNE_SHARED_SOLVES": "1" if shared else "0"}
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        worker_args = [os.path.abspath(__file__), "--worker", out, run, str(args.num_samples), str(args.seqlen),
                       args.device]
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        start = time.perf_counter()
        result = subprocess.run(launcher + worker_args, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return {"run": run, "setup": setup, "error": result.stderr[-2000:]}
        with open(out, encoding="utf-8") as handle:
            row = json.load(handle)
    return {"run": run, "setup": setup, "processes": processes, "shared": shared, **row,
            "wall_s": round(time.perf_counter() - start, 1), "when": time.strftime("%Y-%m-%d %H:%M")}


def report(rows: list[dict], args) -> str:
    lines = [f"Command: `{command_line('distributed_solves.py')}`", "",
             f"SmolLM2-135M float32, {args.num_samples} x {args.seqlen} calibration tokens, one thread per process, "
             f"device {args.device} ({'gloo' if args.device == 'cpu' else 'NCCL'}); `solve s` = rank 0's solve phase.", "",
             "| run | setup | solve s | solve / 1 process | statistics s | forward s | prune s | weights |",
             "|---|---|---|---|---|---|---|---|"]
    for run in args.runs:
        found = {row["setup"]: row for row in rows if row["run"] == run and "error" not in row}
        single = found.get("1 process")
        reference = found.get("2 processes, each solves everything")
        for setup in SETUPS:
            row = found.get(setup)
            if row is None:
                continue
            ratio = f"{row['solve_s'] / single['solve_s']:.2f}" if single else "-"
            if setup == "1 process":
                same = "reference of the ratio"
            elif reference is None:
                same = "-"
            else:
                same = ("identical to each-solves-everything" if row["sha256"] == reference["sha256"]
                        else "DIFFERENT from each-solves-everything") if row is not reference else "reference of the weights"
            lines.append(f"| {run} | {setup} | {row['solve_s']:.1f} | {ratio} | {row['statistics_s']:.1f} | "
                         f"{row['forward_s']:.1f} | {row['prune_s']:.1f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    found = parser(__doc__, output="distributed-solves.md", seqlen=256, samples=16, resume=True)
    found.add_argument("--runs", nargs="+", default=["alps:0.7", "fista:0.7"])
    found.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    found.add_argument("--report-only", action="store_true")
    found.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per process (NCCL)")
    args = found.parse_args(argv)
    rows = Rows(args.resume, key=lambda row: (row["run"], row["setup"]))
    for run in args.runs:
        for setup in args.setups:
            if not args.report_only:
                rows.measured((run, setup), lambda: measure(run, setup, args))
    write_report(args.output, report(list(rows.done.values()), args))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
