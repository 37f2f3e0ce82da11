"""LoRA recovery after pruning on SmolLM2-135M: perplexity dense / pruned / pruned + recovery.

Each run prunes the packaged SmolLM2-135M (EVAL.md protocol: 64 x 512 calibration tokens from the
packaged Wikipedia leads, seed 0), measures perplexity on the evaluation split, trains LoRA
adapters (`optimum_prune.recovery.recover_lora`) on windows drawn from the calibration split with
seed 1, merges them, re-applies the sparsity masks and measures again. Each run in its own process.

    python benchmarks/recovery.py                                   # -> docs/results/recovery.md
    python benchmarks/recovery.py --runs wanda:0.5 --steps 20 --output /tmp/r.md
    python benchmarks/recovery.py --runs dense          # the same LoRA run on the dense model
"""

from __future__ import annotations

import platform

import torch
from harness import in_process, load_fp32, parse_run, parser as harness_parser, peak_rss_mb, write_report


RUNS = ["wanda:0.5", "fasp:s0.2"]


def _run(args, spec, queue):
    import time

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.evaluation import perplexity
    from optimum_prune.recovery import LoraRecoveryConfig, recover_lora

    model, tokenizer = load_fp32(args.checkpoint)

    def ppl():
        return perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=args.seqlen, max_windows=args.eval_windows)

    start = time.perf_counter()
    if spec != "dense":  # "dense": the same LoRA run on the unpruned model, for reference
        method, options, pattern, sparsity = parse_run(spec)
        config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity,
                               num_calibration_samples=args.num_samples, seqlen=args.seqlen, method_kwargs=options)
        windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, 0)
        Pruner(config).prune(model, windows, progress=False)
    prune_s = time.perf_counter() - start
    pruned = ppl()
    zeros_before = sum(int((p == 0).sum()) for n, p in model.named_parameters() if ".layers." in n)
    train = calibration_windows("packaged:wiki-leads", tokenizer, args.train_samples, args.train_seqlen, 1)
    settings = LoraRecoveryConfig(steps=args.steps, lr=args.lr, rank=args.rank, alpha=2 * args.rank,
                                  batch_size=args.batch_size)
    info = recover_lora(model, train, settings, progress=False)
    zeros_after = sum(int((p == 0).sum()) for n, p in model.named_parameters() if ".layers." in n)
    queue.put({"spec": spec, "prune_s": prune_s, "ppl_pruned": pruned, "ppl_recovered": ppl(), "recovery": info,
               "zeros_kept": zeros_after >= zeros_before, "peak_rss_mb": peak_rss_mb()})


def _dense(args, queue):
    from optimum_prune.evaluation import perplexity

    model, tokenizer = load_fp32(args.checkpoint)
    queue.put({"ppl": perplexity(model, tokenizer, "packaged:wiki-leads-eval", seqlen=args.seqlen,
                                 max_windows=args.eval_windows)})


def main():
    parser = harness_parser(__doc__, output="recovery.md", seqlen=512, samples=64, eval_windows=64)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--train-seqlen", type=int, default=256)
    args = parser.parse_args()
    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    dense = in_process(_dense, args)["ppl"]
    print(f"dense perplexity {dense:.2f}", flush=True)
    lines = []
    for spec in args.runs:
        row = in_process(_run, args, spec)
        rec = row["recovery"]
        print(row, flush=True)
        method, _, pattern, sparsity = parse_run(spec) if spec != "dense" else ("dense", None, "-", None)
        label = (f"{sparsity:.0%}" if pattern == "unstructured" else
                 f"structured {sparsity:.0%}" if sparsity else pattern)
        lines.append(
            f"| {method} | {label} | {row['ppl_pruned']:.2f} | {row['ppl_recovered']:.2f} | "
            f"{row['ppl_recovered'] / row['ppl_pruned']:.2f} | {rec['loss_first']:.3f} -> {rec['loss_last']:.3f} | "
            f"{row['prune_s']:.0f} | {rec['seconds']:.0f} | {'yes' if row['zeros_kept'] else 'NO'} | {row['peak_rss_mb']:.0f} |"
        )
    table = (
        f"SmolLM2-135M-Instruct (fp32); calibration {args.num_samples} x {args.seqlen} tokens (seed 0); perplexity on "
        f"{args.eval_windows} x {args.seqlen} evaluation windows; dense perplexity {dense:.2f}. LoRA rank {args.rank}, "
        f"alpha {2 * args.rank}, on every Linear of the decoder layers, {args.steps} steps x {args.batch_size} windows x "
        f"{args.train_seqlen} tokens ({args.steps * args.batch_size * args.train_seqlen:,} tokens) from "
        f"{args.train_samples} windows of the calibration split (seed 1), AdamW lr {args.lr:g} (10% warm-up, cosine), "
        f"merged, masks re-applied. {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.\n\n"
        "| method | sparsity | perplexity before LoRA | perplexity + LoRA | ratio | training loss (first -> last 10%) | "
        "prune time (s) | recovery time (s) | zeros kept | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(lines) + "\n"
    )
    print(table)
    command = (f"python benchmarks/recovery.py --steps {args.steps} --lr {args.lr:g} --rank {args.rank} "
               f"--batch-size {args.batch_size} --train-seqlen {args.train_seqlen}"
               + ("" if args.runs == RUNS else " --runs " + " ".join(args.runs)))
    write_report(args.output, f"# LoRA recovery on SmolLM2-135M\n\nCommand: `{command}`\n\n{table}", echo=False)


if __name__ == "__main__":
    main()
