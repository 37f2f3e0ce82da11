"""Depth against width on SmolLM2-135M: whole decoder layers removed by block influence (ShortGPT),
attention and MLP blocks removed by block influence (``granularity="block"``), next to FASP's uniform
channel pruning, and the policy-gradient search over channels alone or over channels and block gates
together, at the same fraction of the decoder layers' parameters.

Perplexity on the two held-out texts of benchmarks/texts.py (the Wikipedia evaluation split, the
Python reference), several calibration seeds (mean ± standard deviation), parameters left. With
``--speed``, each run's seed-0 model is saved and measured in a fresh process (prefill tokens/s,
decode ms/token in transformers: `harness.speed_of`), and a perplexity-against-speed plot is drawn
next to the report. Each row runs in its own process; rows resume from ``--resume``, and the report
also shows the other seeds that file holds for the requested runs (the seeds column counts them).

    python benchmarks/depth.py --seeds 0 1 2 --speed --resume /tmp/depth-rows.jsonl
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from harness import (Rows, add_speed_arguments, command_line, in_process, llama_cpp_speed, load_fp32, parse_run,
                     parser as harness_parser, speed_of, write_report)
from texts import TEXTS, perplexities


BLOCKS = 'block-influence[granularity="block"]'
LOSS = 'block-influence[score="loss"]'  # the measured baseline: loss increase of each layer removed alone
RUNS = [f"{name}:s{level}" for level in (0.2, 0.3) for name in ("block-influence", BLOCKS, LOSS, "fasp")]


def _dense(args, queue):
    model, tokenizer = load_fp32(args.checkpoint)
    queue.put({"key": "dense", "ppl": perplexities(model, tokenizer, args.seqlen, args.eval_windows),
               "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers})


def _pruned(args, spec, seed):
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
    return model, tokenizer, pruner, time.perf_counter() - start


def _prune(args, spec, seed, folder, queue):
    """One row (perplexities, what went); with ``folder``, the pruned model is also saved there."""
    model, tokenizer, pruner, seconds = _pruned(args, spec, seed)
    if folder:
        pruner.save_pretrained(folder, tokenizer=tokenizer)
    queue.put({"key": f"{spec}:{seed}", "spec": spec, "seed": seed, "prune_s": seconds,
               "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
               "removed_layers": pruner.report.removed_layers, "removed_blocks": pruner.report.removed_blocks,
               "unit_scores": pruner.report.unit_scores, "sparsity": pruner.report.overall_sparsity,
               "declined_refits": dict(pruner.report.declined_refits),
               "ppl": perplexities(model, tokenizer, args.seqlen, args.eval_windows)})


def _speed_rows(args, done: Rows) -> dict:
    """spec (or "dense") -> the speed of its seed-0 model in transformers (and with ``--llama-cpp``, under
    ``"llama_cpp"``, its GGUF's in llama.cpp), each measured in a fresh process. The model is saved by the
    prune that makes its seed-0 row (pruned again only when that row is already finished)."""
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, spec in enumerate(["dense", *args.runs]):
            folder = args.checkpoint if spec == "dense" else os.path.join(tmp, f"run{number}")

            def saved(spec=spec, folder=folder):
                if spec != "dense":
                    done.measured(f"{spec}:0", lambda: in_process(_prune, args, spec, 0, folder))
                    if not os.path.isdir(folder):
                        in_process(_prune, args, spec, 0, folder)  # the row was finished before: the model again
                return folder

            speeds[spec] = done.measured(f"speed:{spec}",
                                         lambda: {"key": f"speed:{spec}", **in_process(speed_of, saved(), args)})
            if args.llama_cpp:
                gguf = os.path.join(tmp, f"run{number}-f32.gguf")
                speeds[spec] = {**speeds[spec], "llama_cpp": done.measured(
                    f"llama.cpp:{spec}",
                    lambda: {"key": f"llama.cpp:{spec}", **in_process(llama_cpp_speed, saved(), gguf, args)})}
    return speeds


def _speed_ups(speeds: dict) -> dict[str, dict[str, float]]:
    """Per engine, spec -> generated tokens/s over the dense model's (transformers: decode ms/token; llama.cpp:
    generated tokens/s), for the engines measured."""
    ups = {"transformers": {spec: speeds["dense"]["decode_ms_per_token"] / speed["decode_ms_per_token"]
                            for spec, speed in speeds.items()}}
    if all("llama_cpp" in speed for speed in speeds.values()):
        base = speeds["dense"]["llama_cpp"]["generated_tps"]
        ups["llama.cpp"] = {spec: speed["llama_cpp"]["generated_tps"] / base for spec, speed in speeds.items()}
    return ups


def plot(rows: list[dict], dense: dict, speeds: dict, path: str) -> str:
    """Mean perplexity (each text, log scale) against the decode speed-up over the dense model, one row of
    panels per engine measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = _speed_ups(speeds)
    fig, axes = plt.subplots(len(ups), len(TEXTS), figsize=(11, 4.2 * len(ups)), squeeze=False)
    for panels, (engine, up) in zip(axes, ups.items()):
        for ax, text in zip(panels, TEXTS):
            for spec in dict.fromkeys(r["spec"] for r in rows):
                ppl = statistics.mean(r["ppl"][text] for r in rows if r["spec"] == spec)
                ax.scatter([up[spec]], [ppl], zorder=3)
                ax.annotate(_label(spec), (up[spec], ppl), fontsize=7, xytext=(4, 2), textcoords="offset points")
            ax.scatter([1.0], [dense["ppl"][text]], marker="s", color="gray")
            ax.annotate("dense", (1.0, dense["ppl"][text]), fontsize=7, xytext=(4, 2), textcoords="offset points")
            ax.set(xlabel=f"decode speed-up over dense ({engine}, CPU)", ylabel=f"perplexity {text} (log)",
                   yscale="log", title=f"SmolLM2-135M: {text}, {engine}")
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(spec: str) -> str:
    """A run's name on the plot: options shortened."""
    for long, short in (('[granularity="block"]', " blocks"), ('[score="loss"]', " loss"), ("policy_gradient", "pg"),
                        ('blocks="block"', "+blocks"), ('blocks="layer"', "+layers"), ("block_start=", "start ")):
        spec = spec.replace(long, short)
    return spec


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


def _speed_cells(speed: dict | None, dense: dict | None) -> str:
    if not speed:
        return ""
    cells = (f" {speed['prefill_tokens_per_s']:.0f} | {speed['decode_ms_per_token']:.2f} | "
             f"{dense['decode_ms_per_token'] / speed['decode_ms_per_token']:.2f}x |")
    if "llama_cpp" in speed:
        ours, base = speed["llama_cpp"], dense["llama_cpp"]
        cells += (f" {ours['prompt_tps']:.0f} | {ours['generated_tps']:.1f} | "
                  f"{ours['generated_tps'] / base['generated_tps']:.2f}x |")
    return cells


def table(rows: list[dict], dense: dict, speeds: dict) -> str:
    timed = " prefill tok/s | decode ms/token | decode speed-up |" if speeds else ""
    if speeds and "llama_cpp" in speeds["dense"]:
        timed += " llama.cpp prompt tok/s | llama.cpp generated tok/s | llama.cpp speed-up |"
    lines = ["| run | seeds | decoder layers | parameters | " + " | ".join(f"ppl {t}" for t in TEXTS)
             + " | layers removed; blocks left out (per seed) |" + timed,
             "|---|---|---|---|" + "---|" * len(TEXTS) + "---|" + "---|" * timed.count("|"),
             f"| dense | - | {dense['layers']} | {dense['params']:,} | "
             + " | ".join(f"{dense['ppl'][t]:.2f}" for t in TEXTS) + " | - |"
             + _speed_cells(speeds.get("dense"), speeds.get("dense"))]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        runs = [r for r in rows if r["spec"] == spec]
        lines.append(f"| {spec} | {len(runs)} | {runs[0]['layers']} | {runs[0]['params']:,} | "
                     + " | ".join(_mean_spread([r["ppl"][t] for r in runs]) for t in TEXTS) + " | "
                     + "; ".join(_removed(r) for r in runs) + " |" + _speed_cells(speeds.get(spec), speeds.get("dense")))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = harness_parser(__doc__, output="depth.md", seqlen=512, samples=64, eval_windows=64, seeds=True,
                            resume=True)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--speed", action="store_true", help="also measure each run's seed-0 model (run alone)")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="with --speed, also its GGUF (f32) in llama.cpp (the xllamacpp wheel)")
    parser.add_argument("--llama-new", type=int, default=128, help="tokens llama.cpp generates per timed run")
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    done = Rows(args.resume, key=lambda row: row["key"])
    speeds = _speed_rows(args, done) if args.speed else {}  # first: timings want a quiet machine
    dense = done.measured("dense", lambda: in_process(_dense, args))
    rows = [done.measured(f"{spec}:{seed}", lambda spec=spec, seed=seed: in_process(_prune, args, spec, seed, None))
            for spec in args.runs for seed in args.seeds]
    # seeds finished earlier for these runs (e.g. more seeds for a few of them) join their rows
    rows += [row for row in done.done.values() if row.get("spec") in args.runs and row["seed"] not in args.seeds]
    text = ("# Depth against width on SmolLM2-135M\n\n"
            f"Command: `{command_line('depth.py', argv)}`\n\n"
            f"SmolLM2-135M-Instruct (fp32), calibration {args.num_samples} x {args.seqlen} tokens of the packaged "
            f"Wikipedia leads (seed per row), perplexity on {args.eval_windows} x {args.seqlen} windows of each text "
            "(`wiki`: the evaluation split of the calibration corpus; `python`: the Python reference). "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. Sparsity: the fraction of the decoder "
            "layers' parameters removed (block-influence: whole layers, the first and last kept; with "
            "granularity=block: attention and MLP blocks ranked together, a layer losing both removed whole; with "
            "score=loss: layers ranked by the loss increase of removing each alone on 8 calibration windows; fasp: MLP "
            "channels and KV groups of every layer, uniform; policy_gradient: the global search over MLP channels and "
            "KV groups, 200 steps, with blocks= also over layer or attention / MLP block gates under one parameter "
            "budget, started at block_start for the median-influence gate; with cost=\"latency\" the budget and the "
            "sparsity are of the modelled decode time instead, latency_model's per-block costs).\n\n" + table(rows, dense, speeds))
    if speeds:
        figure = plot(rows, dense, speeds, os.path.splitext(args.output)[0] + ".png")
        text += (f"\nSpeed: each run's seed-0 model saved and loaded in a fresh process, transformers fp32 on "
                 f"{args.device}, prefill {args.batch_size} x {args.prompt_length} tokens, decode {args.new_tokens} greedy "
                 f"steps through the KV cache, median of {args.repeats} runs."
                 + (f" llama.cpp: the same folder written as GGUF (f32; `export_gguf`), {torch.get_num_threads()} threads, "
                    f"one request of {args.prompt_length} prompt tokens generating {args.llama_new}, median of "
                    f"{args.repeats} runs after a warm-up, llama.cpp's own timings." if args.llama_cpp else "")
                 + "\n\n![perplexity against decode speed-up]"
                 f"({os.path.basename(figure)})\n")
    write_report(args.output, text)


if __name__ == "__main__":
    main()
