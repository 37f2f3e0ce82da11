"""Recovery after pruning on SmolLM2-135M: LoRA against distillation from the dense model, at the
same training tokens; perplexity dense / pruned / recovered on two held-out texts.

Each (run, seed) prunes the packaged SmolLM2-135M (EVAL.md protocol: 64 x 512 calibration tokens
from the packaged Wikipedia leads, calibration seed ``seed``) once, measures it, and then, from
that same pruned model, runs each recovery asked for on the same training windows (drawn from the
calibration split with seed ``seed + 1``): ``lora`` (`recover_lora`: rank-8 adapters on every
decoder Linear, merged back), ``distill`` (`recover_distill`: every parameter trained to the
dense model's logits, forward KL alone: ``ce_weight=0``, as the rows measured before the library's
default became 0.5; ``distill[ce_weight=0.5,hidden_weight=1,lr=3e-4]`` sets `DistillConfig` fields) and ``finetune`` (every parameter on the next-token loss, no teacher:
``DistillConfig(ce_weight=1)``; on ``--runs dense`` the fair reference of a full-parameter
recovery). Perplexity on the evaluation split of the Wikipedia leads and on
the Python reference (benchmarks/texts.py). Each (run, seed) in its own process.

    python benchmarks/recovery.py --runs fasp:s0.2 --recoveries lora distill --resume rows.jsonl \
        --output docs/results/distill.md
    python benchmarks/recovery.py --runs dense --recoveries lora      # the same LoRA run on the dense model
"""

from __future__ import annotations

import os
import platform

import torch
from harness import (Rows, in_process, load_fp32, parse_named, parse_run, parser as harness_parser, peak_rss_mb,
                     write_report)
from texts import TEXTS, perplexities


RUNS = ["wanda:0.5", "fasp:s0.2"]


def _zeros(model) -> int:
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if ".layers." in n)


def _run(args, spec, seed, recoveries, queue):
    import time

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.recovery import DistillConfig, LoraRecoveryConfig, recover_distill, recover_lora

    model, tokenizer = load_fp32(args.checkpoint)
    start = time.perf_counter()
    if spec != "dense":  # "dense": the recoveries on the unpruned model, for reference
        method, options, pattern, sparsity = parse_run(spec)
        config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity,
                               num_calibration_samples=args.num_samples, seqlen=args.seqlen, method_kwargs=options)
        windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, seed)
        Pruner(config).prune(model, windows, progress=False)
    prune_s = time.perf_counter() - start
    pruned_ppl = perplexities(model, tokenizer, args.seqlen, args.eval_windows)
    pruned_state = {name: value.clone() for name, value in model.state_dict().items()}
    train = calibration_windows("packaged:wiki-leads", tokenizer, args.train_samples, args.train_seqlen, seed + 1)
    rows = []
    for recovery in recoveries:
        model.load_state_dict(pruned_state)
        zeros_before = _zeros(model)
        name, options = parse_named(recovery)
        if name == "lora":
            settings = LoraRecoveryConfig(**{"steps": args.steps, "lr": args.lora_lr, "rank": args.rank,
                                             "alpha": 2 * args.rank, "batch_size": args.batch_size, **options})
            info = recover_lora(model, train, settings, progress=False)
        else:  # distill, or finetune: the same training with the next-token loss alone and no teacher
            fixed = {"ce_weight": 1.0} if name == "finetune" else {}
            settings = DistillConfig(**{"steps": args.steps, "lr": args.distill_lr, "batch_size": args.batch_size,
                                        "temperature": args.temperature, "ce_weight": 0.0, **options, **fixed})
            teacher = load_fp32(args.checkpoint)[0] if settings.needs_teacher else None
            info = recover_distill(model, teacher, train, settings, progress=False)
            del teacher
        rows.append({"spec": spec, "seed": seed, "recovery": recovery, "prune_s": prune_s, "ppl_pruned": pruned_ppl,
                     "ppl_recovered": perplexities(model, tokenizer, args.seqlen, args.eval_windows),
                     "loss_first": info["loss_first"], "loss_last": info["loss_last"], "recovery_s": info["seconds"],
                     "tokens": args.steps * args.batch_size * args.train_seqlen, "lr": settings.lr,
                     "zeros_kept": _zeros(model) >= zeros_before, "peak_rss_mb": peak_rss_mb()})
    queue.put(rows)


def _dense(args, queue):
    model, tokenizer = load_fp32(args.checkpoint)
    queue.put(perplexities(model, tokenizer, args.seqlen, args.eval_windows))


def _table(args, rows, dense) -> str:
    lines = []
    for row in rows:
        method, _, pattern, sparsity = parse_run(row["spec"]) if row["spec"] != "dense" else ("dense", None, "-", None)
        label = f"{sparsity:.0%}" if pattern == "unstructured" else f"structured {sparsity:.0%}" if sparsity else pattern
        ppl = " | ".join(f"{row['ppl_pruned'][t]:.2f} -> {row['ppl_recovered'][t]:.2f}" for t in TEXTS)
        lines.append(f"| {method} | {label} | {row['seed']} | {row['recovery']} | {row['lr']:g} | {ppl} | "
                     f"{row['loss_first']:.3f} -> {row['loss_last']:.3f} | {row['recovery_s']:.0f} | "
                     f"{'yes' if row['zeros_kept'] else 'NO'} | {row['peak_rss_mb']:.0f} |")
    texts = " | ".join(f"{t} perplexity (pruned -> recovered)" for t in TEXTS)
    return (
        f"SmolLM2-135M-Instruct (fp32); calibration {args.num_samples} x {args.seqlen} tokens (seed = the row's seed); "
        f"perplexity on {args.eval_windows} x {args.seqlen} windows of each text; dense perplexity "
        + ", ".join(f"{t} {dense[t]:.2f}" for t in TEXTS) + ". Both recoveries of a row start from the same pruned "
        f"model and train {args.steps} steps x {args.batch_size} windows x {args.train_seqlen} tokens "
        f"({args.steps * args.batch_size * args.train_seqlen:,} tokens) from {args.train_samples} windows of the "
        f"calibration split (seed + 1), AdamW (10% warm-up, cosine). LoRA: rank {args.rank}, alpha {2 * args.rank}, "
        f"every decoder Linear, merged. Distillation: every parameter, forward KL to the dense model's logits at "
        f"temperature {args.temperature:g}; `distill[ce_weight=w]`: (1 - w) KL + w next-token cross-entropy; "
        f"`hidden_weight=h`: plus h x the hidden-state term (every layer's output, relative squared distance to the "
        f"dense model's); `finetune`: every parameter, next-token cross-entropy alone. Masks kept by all. {platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}.\n\n"
        f"| method | sparsity | seed | recovery | lr | {texts} | training loss (first -> last 10%) | recovery time (s) "
        f"| zeros kept | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def _summary(rows) -> str:
    """Mean ± standard deviation over the seeds of each (run, recovery, lr), and its ratio to LoRA's
    mean on the same run and seeds (the issue's comparison)."""
    import statistics

    groups: dict = {}
    for row in rows:
        groups.setdefault((row["spec"], row["recovery"], row["lr"]), []).append(row)
    lora = {spec: group for (spec, recovery, _), group in groups.items() if recovery == "lora"}
    tuned = [row for (spec, recovery, _), group in groups.items() if (spec, recovery) == ("dense", "finetune")
             for row in group]  # the dense model fine-tuned on the same tokens: the fair reference
    lines = []
    for (spec, recovery, lr), group in groups.items():
        cells = []
        for text in TEXTS:
            values = [row["ppl_recovered"][text] for row in group]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        for text in TEXTS:
            seeds = {row["seed"] for row in group}
            reference = [row["ppl_recovered"][text] for row in lora.get(spec, []) if row["seed"] in seeds]
            mine = [row["ppl_recovered"][text] for row in group if row["seed"] in {r["seed"] for r in lora.get(spec, [])}]
            cells.append(f"{statistics.mean(mine) / statistics.mean(reference):.3f}" if reference and mine else "-")
        for text in TEXTS:
            mine = statistics.mean(row["ppl_recovered"][text] for row in group)
            cells.append(f"{mine / statistics.mean(row['ppl_recovered'][text] for row in tuned):.2f}" if tuned else "-")
        seeds = ", ".join(str(row["seed"]) for row in sorted(group, key=lambda row: row["seed"]))
        lines.append(f"| {spec} | {recovery} | {lr:g} | {seeds} | " + " | ".join(cells) + " |")
    head = (" | ".join(f"{t} mean ± sd" for t in TEXTS) + " | " + " | ".join(f"{t} / LoRA" for t in TEXTS) + " | "
            + " | ".join(f"{t} / dense fine-tuned" for t in TEXTS))
    return (f"\nOver the seeds (recovered perplexity; its ratio to LoRA's mean over the same run and seeds, and to the "
            f"dense model fine-tuned on the same tokens, `dense` / `finetune`):\n\n"
            f"| run | recovery | lr | seeds | {head} |\n|---|---|---|---|" + "---|" * (3 * len(TEXTS)) + "\n"
            + "\n".join(lines) + "\n")


def main():
    parser = harness_parser(__doc__, output="recovery.md", seqlen=512, samples=64, eval_windows=64, seeds=True,
                            resume=True)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--recoveries", nargs="+", default=["lora"],
                        help="lora, distill or finetune, each optionally with [field=value,...] of its config")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from the --resume rows, running nothing (the dense perplexity from a "
                             "dense row when there is one)")
    args = parser.parse_args()
    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    done = Rows(args.resume, key=lambda row: (row["spec"], row["seed"], row["recovery"], row["lr"]))
    measured = [row["ppl_pruned"] for row in done.done.values() if row["spec"] == "dense"]
    dense = measured[0] if args.report_only and measured else in_process(_dense, args)
    print(f"dense perplexity {dense}", flush=True)

    def lr(recovery):
        name, options = parse_named(recovery)
        if name not in ("lora", "distill", "finetune"):
            parser.error(f"unknown recovery {recovery!r}: lora, distill or finetune")
        return options.get("lr", args.lora_lr if name == "lora" else args.distill_lr)

    for spec in [] if args.report_only else args.runs:
        for seed in args.seeds:
            missing = [recovery for recovery in args.recoveries if not done.get((spec, seed, recovery, lr(recovery)))]
            if not missing:
                continue
            for row in in_process(_run, args, spec, seed, missing):
                if not done.get((row["spec"], row["seed"], row["recovery"], row["lr"])):
                    done.add(row)
    rows = [row for row in done.done.values() if row["spec"] in args.runs and row["seed"] in args.seeds
            and row["recovery"] in args.recoveries]
    table = _table(args, rows, dense) + _summary(rows)
    print(table)
    argv = __import__("sys").argv[1:]
    if "--output" in argv:  # where the report goes is not part of what was measured
        del argv[argv.index("--output"):argv.index("--output") + 2]
    command = "python benchmarks/recovery.py " + " ".join(os.path.relpath(a) if os.path.isabs(a) else a for a in argv)
    write_report(args.output, f"# Recovery on SmolLM2-135M: LoRA and distillation\n\nCommand: `{command}` (rows read "
                              f"back from the --resume file where a run had finished).\n\n{table}", echo=False)


if __name__ == "__main__":
    main()
