"""Depth against width on SmolLM2-135M: whole decoder layers removed by block influence (ShortGPT),
attention and MLP blocks removed by block influence (``granularity="block"``), next to FASP's uniform
channel pruning, at the same fraction of the decoder layers' parameters.

Perplexity on the two held-out texts of benchmarks/texts.py (the Wikipedia evaluation split, the
Python reference), several calibration seeds (mean ± standard deviation), parameters left. Each
row runs in its own process; rows resume from ``--resume``.

    python benchmarks/depth.py --seeds 0 1 2 --resume /tmp/depth-rows.jsonl
"""

from __future__ import annotations

import statistics
import time

import torch

from harness import Rows, command_line, in_process, load_fp32, parse_run, parser as harness_parser, write_report
from texts import TEXTS, perplexities


BLOCKS = 'block-influence[granularity="block"]'
RUNS = ["block-influence:s0.2", "block-influence:s0.3", f"{BLOCKS}:s0.2", "fasp:s0.2", f"{BLOCKS}:s0.3", "fasp:s0.3"]


def _dense(args, queue):
    model, tokenizer = load_fp32(args.checkpoint)
    queue.put({"key": "dense", "ppl": perplexities(model, tokenizer, args.seqlen, args.eval_windows),
               "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers})


def _prune(args, spec, seed, queue):
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows

    method, options, pattern, sparsity = parse_run(spec)
    model, tokenizer = load_fp32(args.checkpoint)
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, seed=seed, method_kwargs=options,
                           num_calibration_samples=args.num_samples, seqlen=args.seqlen)
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, seed)
    pruner = Pruner(config)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False)
    queue.put({"key": f"{spec}:{seed}", "spec": spec, "seed": seed, "prune_s": time.perf_counter() - start,
               "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
               "removed_layers": pruner.report.removed_layers, "removed_blocks": pruner.report.removed_blocks,
               "sparsity": pruner.report.overall_sparsity,
               "ppl": perplexities(model, tokenizer, args.seqlen, args.eval_windows)})


def _mean_spread(values) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def _removed(row: dict) -> str:
    """``[12, 13]`` for whole layers, ``+ attn 3 5, mlp 7`` after them for blocks left out."""
    text = str(row["removed_layers"])
    blocks = row.get("removed_blocks") or []
    for kind, short in (("self_attn", "attn"), ("mlp", "mlp")):
        layers = [name.split(".")[-2] for name in blocks if name.endswith("." + kind)]
        if layers:
            text += f" + {short} {' '.join(layers)}"
    return text


def table(rows: list[dict], dense: dict) -> str:
    lines = ["| run | seeds | decoder layers | parameters | " + " | ".join(f"ppl {t}" for t in TEXTS)
             + " | layers removed; blocks left out (per seed) |", "|---|---|---|---|" + "---|" * len(TEXTS) + "---|",
             f"| dense | - | {dense['layers']} | {dense['params']:,} | "
             + " | ".join(f"{dense['ppl'][t]:.2f}" for t in TEXTS) + " | - |"]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        runs = [r for r in rows if r["spec"] == spec]
        lines.append(f"| {spec} | {len(runs)} | {runs[0]['layers']} | {runs[0]['params']:,} | "
                     + " | ".join(_mean_spread([r["ppl"][t] for r in runs]) for t in TEXTS) + " | "
                     + "; ".join(_removed(r) for r in runs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = harness_parser(__doc__, output="depth.md", seqlen=512, samples=64, eval_windows=64, seeds=True,
                            resume=True)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    args = parser.parse_args(argv)
    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    done = Rows(args.resume, key=lambda row: row["key"])
    dense = done.measured("dense", lambda: in_process(_dense, args))
    rows = [done.measured(f"{spec}:{seed}", lambda spec=spec, seed=seed: in_process(_prune, args, spec, seed))
            for spec in args.runs for seed in args.seeds]
    text = ("# Depth against width on SmolLM2-135M\n\n"
            f"Command: `{command_line('depth.py', argv)}`\n\n"
            f"SmolLM2-135M-Instruct (fp32), calibration {args.num_samples} x {args.seqlen} tokens of the packaged "
            f"Wikipedia leads (seed per row), perplexity on {args.eval_windows} x {args.seqlen} windows of each text "
            "(`wiki`: the evaluation split of the calibration corpus; `python`: the Python reference). "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. Sparsity: the fraction of the decoder "
            "layers' parameters removed (block-influence: whole layers, the first and last kept; with "
            "granularity=block: attention and MLP blocks ranked together, a layer losing both removed whole; fasp: MLP "
            "channels and KV groups of every layer, uniform).\n\n" + table(rows, dense))
    write_report(args.output, text)


if __name__ == "__main__":
    main()
