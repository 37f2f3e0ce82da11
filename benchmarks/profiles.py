"""Sparsity profiles on SmolLM2-135M: uniform against ``owl`` and ``sensitivity``, for the same
method and average sparsity, on two held-out texts and over calibration seeds.

Protocol as `benchmarks/smollm2.py` (64 x 512 calibration windows of the packaged Wikipedia leads,
each run in its own process), with the calibration seed varied (``--seeds``) and perplexity on both
texts of `benchmarks/texts.py`: the evaluation split of the calibration corpus (``wiki``) and the
Python reference (``python``, a text the profiles were not chosen on).

    python benchmarks/profiles.py                                  # -> docs/results/profiles.md
    python benchmarks/profiles.py --levels 0.7 --methods wanda --seeds 0 1 2 --resume rows.jsonl
    python benchmarks/smollm2.py --profiles                        # the same
    python benchmarks/profiles.py --methods sparsegpt --levels 0.5 --pattern 2:4 --layer-patterns 1:4 dense
    python benchmarks/profiles.py --methods alps --profiles uniform --options eigh_dtype=float32

With an N:M ``--pattern`` the level is the average sparsity asked for; ``uniform`` prunes every layer to
the pattern, ``sensitivity`` lets each layer take the pattern or one of ``--layer-patterns``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

from harness import Rows, command_line, in_process, load_fp32, parser as harness_parser, peak_rss_mb, write_report
from texts import TEXTS, perplexities

PROFILES = ("uniform", "owl", "sensitivity")
METHODS = ("wanda", "sparsegpt", "alps")
LEVELS = (0.7, 0.6)


def _windows(args, tokenizer, seed: int):
    from optimum_prune.calibration.data import calibration_windows

    return calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, seed)


def _perplexities(args, model, tokenizer) -> dict:
    return perplexities(model, tokenizer, args.seqlen, args.eval_windows)


def _dense(args, queue):
    model, tokenizer = load_fp32(args.checkpoint)
    windows = _windows(args, tokenizer, 0)
    with torch.no_grad():
        start = time.perf_counter()
        for batch in windows.split(8):
            model(input_ids=batch, use_cache=False)
        forward_s = time.perf_counter() - start
    queue.put({"key": "dense", "ppl": _perplexities(args, model, tokenizer), "forward_s": forward_s})


def _prune(args, method, level, profile, seed, queue):
    from optimum_prune import Pruner, PruningConfig

    from optimum_prune.calibration import profiles

    model, tokenizer = load_fp32(args.checkpoint)
    extra = {}
    if profile == "sensitivity" and args.sensitivity_offsets:
        profiles.SENSITIVITY_OFFSETS = tuple(args.sensitivity_offsets)  # this process only
    if profile == "sensitivity" and args.sensitivity_samples:
        extra["sensitivity_samples"] = args.sensitivity_samples
    if profile == "owl" and args.owl_lambda is not None:
        extra["owl_lambda"] = args.owl_lambda
    if profile == "owl" and args.owl_threshold is not None:
        extra["owl_threshold"] = args.owl_threshold
    if profile == "sensitivity" and args.layer_patterns:
        extra["layer_patterns"] = args.layer_patterns
    options = _options(args.options)
    config = PruningConfig(method=method, sparsity=level, pattern=args.pattern, sparsity_profile=profile, seed=seed,
                           num_calibration_samples=args.num_samples, seqlen=args.seqlen, method_kwargs=options, **extra)
    pruner = Pruner(config)
    windows = _windows(args, tokenizer, seed)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False)
    prune_s = time.perf_counter() - start
    label = _label(args, profile)
    queue.put({"key": _key(_method(method, args.pattern, options), level, label, seed), "method": method,
               "pattern": args.pattern, "options": options, "level": level, "profile": label,
               "seed": seed, "prune_s": prune_s, "sparsity": pruner.report.overall_sparsity,
               "layer_sparsity": pruner.report.layer_sparsity, "layer_patterns": pruner.report.layer_patterns,
               "peak_rss_mb": peak_rss_mb(),
               "ppl": _perplexities(args, model, tokenizer)})


def _key(method, level, profile, seed) -> str:
    return f"{method}:{level}:{profile}:{seed}"


def _method(method: str, pattern: str = "unstructured", options: dict | None = None) -> str:
    """The method's name, with its N:M pattern and its options when it has them
    (``sparsegpt 2:4``, ``alps [eigh_dtype=float32]``)."""
    name = method if pattern == "unstructured" else f"{method} {pattern}"
    if options:
        name += " [" + ", ".join(f"{key}={value}" for key, value in sorted(options.items())) + "]"
    return name


def _display(row: dict) -> str:
    return _method(row["method"], row.get("pattern", "unstructured"), row.get("options"))


def _options(pairs: list[str] | None) -> dict:
    """``["eigh_dtype=float32", "max_iter=6"]`` -> method options (values read as JSON where they parse)."""
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _label(args, profile: str) -> str:
    """``profile``, with the settings that differ from the library's in brackets."""
    if profile == "owl":
        changed = [f"{name} {value:g}" for name, value in (("lambda", args.owl_lambda), ("M", args.owl_threshold))
                   if value is not None]
        return f"owl [{', '.join(changed)}]" if changed else profile
    if profile != "sensitivity":
        return profile
    changed = [" ".join(args.layer_patterns)] if args.layer_patterns else []
    if args.sensitivity_offsets:
        changed.append("offsets " + " ".join(f"{x:+g}" for x in args.sensitivity_offsets))
    if args.sensitivity_samples:
        changed.append(f"{args.sensitivity_samples} windows")
    return f"{profile} [{', '.join(changed)}]" if changed else profile


def _rank(profile: str) -> int:
    return PROFILES.index(profile.split()[0])  # "owl", "sensitivity [offsets ...]", "owl (df2d49d)"


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: list[dict], dense: dict) -> str:
    lines = ["| method | sparsity | profile | seeds | wiki | x uniform | python | x uniform | prune s | x forward | "
             "layer sparsities | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for row in rows:
        groups.setdefault((_display(row), row["level"], row["profile"]), []).append(row)
    for (method, level, profile), items in groups.items():
        uniform = groups.get((method, level, "uniform"), [])
        seeds = sorted(r["seed"] for r in items)
        cells = []
        for text in TEXTS:
            values = [r["ppl"][text] for r in items]
            base = [r["ppl"][text] for r in uniform if r["seed"] in seeds]
            ratio = (f"{statistics.mean(values) / statistics.mean(base):.3f}"
                     if profile != "uniform" and len(base) == len(values) else "-")
            cells += [_mean_spread(values), ratio]
        prune = statistics.mean(r["prune_s"] for r in items)
        spread, chosen = items[0]["layer_sparsity"], items[0].get("layer_patterns")
        spread_text = f"{min(spread):.2f}-{max(spread):.2f}" if spread else "-"
        if chosen:  # mixed N:M: how many layers took each pattern (first seed)
            spread_text = ", ".join(f"{name} x{chosen.count(name)}" for name in sorted(set(chosen)))
        lines.append(f"| {method} | {level:.0%} | {profile} | {','.join(map(str, seeds))} | {' | '.join(cells)} | "
                     f"{prune:.0f} | {prune / dense['forward_s']:.2f} | {spread_text} | "
                     f"{max(r['peak_rss_mb'] for r in items):.0f} |")
    return "\n".join(lines) + "\n"


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, start = [0.0] * len(values), 0
    while start < len(order):  # tied values share their mean rank
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in order[start:end + 1]:
            ranks[position] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two per-layer sparsity lists (1: same order of layers, 0: unrelated)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else float("nan")


def agreement(rows: list[dict]) -> str:
    """How far ``owl`` orders the layers as the measured ``sensitivity`` does: mean rank correlation of
    their per-layer sparsities over every owl x sensitivity pair (unstructured, any seed), next to the
    agreement of sensitivity runs of other seeds or methods with each other (the measurement's own noise)."""
    chosen = [r for r in rows if r["layer_sparsity"] and r.get("pattern", "unstructured") == "unstructured"
              and "(" not in r["profile"]]  # "owl (df2d49d)": a re-run at an earlier commit, counted once
    sensitive = [r for r in chosen if r["profile"].startswith("sensitivity")]
    lines = ["| owl setting | runs | x sensitivity runs | mean rank correlation | range |", "|---|---|---|---|---|"]
    for label in sorted({r["profile"] for r in chosen if r["profile"].startswith("owl")}):
        owl = [r for r in chosen if r["profile"] == label]
        values = [spearman(a["layer_sparsity"], b["layer_sparsity"]) for a in owl for b in sensitive]
        if values:
            lines.append(f"| {label} | {len(owl)} | {len(sensitive)} | {statistics.mean(values):.2f} | "
                         f"{min(values):.2f} to {max(values):.2f} |")
    pairs = [spearman(a["layer_sparsity"], b["layer_sparsity"])
             for i, a in enumerate(sensitive) for b in sensitive[i + 1:]]
    if pairs:
        lines.append(f"| (sensitivity x sensitivity: other seeds, methods, levels, windows) | {len(sensitive)} | {len(pairs)} pairs | "
                     f"{statistics.mean(pairs):.2f} | {min(pairs):.2f} to {max(pairs):.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> str:
    """Per-layer sparsities chosen by each profile (first seed), one panel per method at each level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["layer_sparsity"] and r["seed"] == min(x["seed"] for x in rows)]
    panels = sorted({(_display(r), r["level"]) for r in shown})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.4), squeeze=False)
    for ax, (method, level) in zip(axes[0], panels):
        for row in shown:
            if (_display(row), row["level"]) == (method, level):
                ax.plot(row["layer_sparsity"], marker=".", label=f"{row['profile']} (wiki {row['ppl']['wiki']:.0f})")
        ax.axhline(level, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{method} {level:.0%}", xlabel="decoder layer", ylabel="sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = harness_parser(__doc__, output="profiles.md", seqlen=512, samples=64, eval_windows=64, seeds=True,
                            resume=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--levels", nargs="+", type=float, default=list(LEVELS))
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    parser.add_argument("--sensitivity-offsets", nargs="+", type=float, default=None,
                        help="sensitivity levels around the request (default: profiles.SENSITIVITY_OFFSETS)")
    parser.add_argument("--owl-lambda", type=float, default=None, help="OWL's lambda (default: the config's)")
    parser.add_argument("--owl-threshold", type=float, default=None, help="OWL's outlier threshold M (default: the config's)")
    parser.add_argument("--sensitivity-samples", type=int, default=None,
                        help="windows the sensitivity loss is measured on (default: the config's)")
    parser.add_argument("--pattern", default="unstructured", help="sparsity pattern, e.g. 2:4 (default: unstructured)")
    parser.add_argument("--layer-patterns", nargs="+", default=None,
                        help="sensitivity with an N:M --pattern: the patterns a layer may take instead (4:8, 1:4, dense)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="the method's own options, e.g. eigh_dtype=float32 (rows are labelled with them)")
    args = parser.parse_args(argv)
    from optimum_prune.assets import smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    done = Rows(args.resume, key=lambda row: row["key"])

    def measured(key, target, *extra):
        return done.measured(key, lambda: in_process(target, args, *extra))

    dense = measured("dense", _dense)
    rows = [measured(_key(_method(m, args.pattern, _options(args.options)), level, _label(args, p), seed), _prune, m,
                     level, p, seed)
            for level in args.levels for m in args.methods for seed in args.seeds for p in args.profiles]
    rows += [r for key, r in done.done.items() if key != "dense" and r not in rows]  # earlier runs of other sets
    rows.sort(key=lambda r: (-r["level"], METHODS.index(r["method"]) if r["method"] in METHODS else 9,
                             _display(r), _rank(r["profile"]), r["profile"], r["seed"]))
    image = plot(rows, os.path.splitext(args.output)[0] + "-layers.png")
    text = (
        "# Sparsity profiles on SmolLM2-135M\n\n"
        f"Command: `{command_line('profiles.py', argv)}`\n\n"
        f"SmolLM2-135M-Instruct (fp32), calibration {args.num_samples} x {args.seqlen} tokens of the packaged Wikipedia "
        f"leads (calibration seed per row), perplexity on {args.eval_windows} x {args.seqlen} windows of each text: "
        "`wiki` = the evaluation split of the calibration corpus, `python` = the Python reference "
        "(`pydoc_data.topics`). "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Dense: wiki {dense['ppl']['wiki']:.2f}, python {dense['ppl']['python']:.2f}; one forward pass over the "
        f"calibration tokens {dense['forward_s']:.1f} s. Several seeds: mean ± standard deviation. "
        "`x uniform`: mean perplexity over the uniform run's mean, same method, level and seeds. "
        "`layer sparsities`: the lowest and highest per-layer sparsity chosen (first seed).\n\n"
        + table(rows, dense) + f"\n![per-layer sparsities]({os.path.basename(image)})\n\n"
        "Do the profiles rank the layers alike? Rank correlation (Spearman) of the per-layer sparsities "
        "each run chose, every owl run against every sensitivity run of this table:\n\n" + agreement(rows)
    )
    write_report(args.output, text)


if __name__ == "__main__":
    main()
