"""Cost at scale: one decoder layer of real model shapes, random weights, every method.

For each shape (LLaMA-family widths up to an 8B layer, and a Qwen2-7B-like layer with biases) and
method, one process builds a model with ``--layers`` decoder layers (vocabulary 512, so embeddings
and head are negligible), prunes it on a fixed number of calibration tokens and records: the
time of one forward pass over those tokens, the engine's phases (`PruneReport.phase_seconds`:
statistics pass, solve, forward for the next layer), the process's peak RSS (and on CUDA the
allocator's peak), and what `Pruner.plan` estimated beforehand. A row that runs longer than
``--cap`` seconds is stopped and reported as such; a row whose time, projected from the same
method's row at the next smaller width with cubic growth, exceeds the cap is not started. Each method's solve time is fitted against the
hidden width, ``t = c * hidden^k`` over the LLaMA shapes measured, and projected to full 8B and 70B
models (`docs/results/scaling.md`).

    python benchmarks/scaling.py                                  # CPU rows -> docs/results/scaling.md
    python benchmarks/scaling.py --device cuda --output docs/results/scaling-gpu.md
    python benchmarks/scaling.py --shapes 576 2048 --methods wanda sparsegpt --output /tmp/s.md
"""

from __future__ import annotations

import ast
import math
import os
import platform
import resource
import sys
import time

import torch

from harness import Rows, in_process, parser as harness_parser, write_report

SHAPES = {  # name -> (family, hidden, intermediate, heads, kv heads)
    "576": ("llama", 576, 1536, 9, 3),  # SmolLM2-135M
    "1024": ("llama", 1024, 4096, 16, 4),  # between the two
    "2048": ("llama", 2048, 8192, 32, 8),  # LLaMA-3.2-1B-like
    "4096": ("llama", 4096, 14336, 32, 8),  # LLaMA-3.1-8B
    "qwen-3584": ("qwen2", 3584, 18944, 28, 4),  # Qwen2.5-7B (q/k/v biases)
}
LLAMA_SHAPES = ("576", "1024", "2048", "4096")
METHODS = ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "alps:0.5", "fista:0.5", "sparsefw:0.5",
           "fasp:s0.2", "spap:s0.2"]
FULL_MODELS = {  # name -> (hidden, intermediate, layers, heads, kv heads): what the projection scales one layer to
    "LLaMA-3.1-8B": (4096, 14336, 32, 32, 8),
    "LLaMA-3.1-70B": (8192, 28672, 80, 64, 8),
}
PROCESSES = 8  # the GPUs of the projection's multi-GPU columns (one process each)
#: DeepSeek-V3's shape (61 layers, counted as MoE layers; 256 routed experts of 2048, one shared, MLA)
DEEPSEEK_V3 = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                   num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=0,
                   num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=512, num_hidden_layers=1)
DEEPSEEK_LAYERS = 61
GPU_MEMORY = 80e9  # bytes of one GPU (H100) for the expert chunks of the MoE projection


def build_model(shape: str, layers: int):
    import transformers

    family, hidden, intermediate, heads, kv = SHAPES[shape]
    config_class = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    config = config_class(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate,
                          num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
                          max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``method:level[:option=value,...]`` -> (method, level, method options); a level ``s0.2`` is
    structured. Options cut the iterative solvers short at widths where a full solve does not fit
    the session (``alps:0.5:max_iter=3``): such a row measures memory and the cost of that many
    iterations, not a full solve."""
    method, level, options = (spec.split(":", 2) + [""])[:3]
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    return method, level, kwargs


def row_config(args, spec: str):
    """The `PruningConfig` of one row."""
    from optimum_prune import PruningConfig

    method, level, options = parse_spec(spec)
    return PruningConfig(method=method, sparsity=float(level.lstrip("s")), num_calibration_samples=args.samples,
                         pattern="structured" if level.startswith("s") else "unstructured", seqlen=args.seqlen,
                         batch_size=args.batch_size, channel_multiple=1, method_kwargs=options)


def plan_fields(plan, args) -> dict:
    """What a row records of `Pruner.plan`'s estimates (per decoder layer)."""
    return {"estimate_mb": {d: b / 2**20 for d, b in plan.peak_bytes.items()}, "estimate_s": plan.seconds,
            "estimate_phases": {k: v / plan.rate / args.layers for k, v in plan.flops.items()},
            "gemm_gflops": plan.rate / 1e9}


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _row(args, shape, spec, queue):
    from optimum_prune import Pruner

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    libraries_mb = rss_mb()
    model = build_model(shape, args.layers).to(device)
    weights_mb = rss_mb() - libraries_mb
    windows = torch.randint(0, 512, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(row_config(args, spec))
    plan = pruner.plan(model, num_windows=args.samples)
    with torch.no_grad():
        for batch in windows[:1].split(1):  # warm-up
            model(input_ids=batch.to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in windows.split(args.batch_size):
            model(input_ids=batch.to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s = (time.perf_counter() - start) / args.layers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prune_s = time.perf_counter() - start
    phases = {k: v / args.layers for k, v in pruner.report.phase_seconds.items()}
    queue.put({
        "shape": shape, "spec": spec, "method": parse_spec(spec)[0], "forward_s": forward_s, "prune_s": prune_s / args.layers,
        "phases": phases, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "libraries_mb": libraries_mb, "weights_mb": weights_mb,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        **plan_fields(plan, args), "sparsity": pruner.report.overall_sparsity,
    })


def _plan_only(args, shape, spec, queue):
    """`Pruner.plan`'s estimates for a row, made as `_row` makes them (same model, same point in the
    process), without pruning: ``--replan`` refreshes measured rows' estimates after a change to the
    estimator."""
    from optimum_prune import Pruner

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model(shape, args.layers).to(args.device)
    plan = Pruner(row_config(args, spec)).plan(model, num_windows=args.samples)
    queue.put({**plan_fields(plan, args), "flops": {k: v / args.layers for k, v in plan.flops.items()}})


def run_capped(cap: float, *args, target=_row):
    """One row in its own process, stopped after ``cap`` seconds (an error row)."""
    return in_process(target, *args, cap=cap)


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of log t = log c + k log h; (c, k), or None with fewer than two points."""
    points = [(h, t) for h, t in points if t > 0]
    if len(points) < 2:
        return None
    xs = [math.log(h) for h, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def main(argv=None):
    parser = harness_parser(__doc__, output="scaling.md", seqlen=256, resume=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cap", type=float, default=900.0, help="seconds a row may run before it is stopped")
    parser.add_argument("--report-only", action="store_true", help="write the report from --resume's rows, run nothing")
    parser.add_argument("--replan", action="store_true",
                        help="re-make the estimates of --resume's measured rows with the current code (rewrites the file; "
                             "times at each row's recorded matmul rate)")
    args = parser.parse_args(argv)
    done = Rows(args.resume, key=lambda row: (row["shape"], row["spec"]))
    if args.replan:
        for row in done.done.values():
            if "error" not in row:
                row.setdefault("estimate_mb_at_run", row["estimate_mb"])  # what the code of the run estimated
                row.setdefault("estimate_s_at_run", row["estimate_s"])
                fresh = run_capped(args.cap, args, row["shape"], row["spec"], target=_plan_only)
                row["estimate_mb"] = fresh["estimate_mb"]
                # the time estimate: the current operation counts at the matmul rate measured beside the prune
                rate = row["gemm_gflops"] * 1e9
                row["estimate_phases"] = {k: v / rate for k, v in fresh["flops"].items()}
                row["estimate_s"] = sum(row["estimate_phases"].values()) * args.layers
                print(row["shape"], row["spec"], row["estimate_mb"], row["estimate_phases"], flush=True)
        done.rewrite()
    rows, last = [], {}  # spec -> (hidden, prune seconds) of its last measured row
    for shape in sorted(args.shapes, key=lambda s: SHAPES[s][1]):
        hidden = SHAPES[shape][1]
        for spec in args.methods:
            row = done.get((shape, spec))
            if row is None and args.report_only:
                continue
            projected = last[spec][1] * (hidden / last[spec][0]) ** 3 if spec in last else 0.0
            if row is None and projected > args.cap:
                row = {"shape": shape, "spec": spec, "method": spec.partition(":")[0],
                       "error": f"not run: ~{projected:.0f} s projected from width {last[spec][0]} > cap"}
            elif row is None:
                row = done.add({"shape": shape, "spec": spec, "method": spec.partition(":")[0],
                                **run_capped(args.cap, args, shape, spec)})
            if "error" not in row:
                last[spec] = (hidden, row["prune_s"])
            elif row["error"].startswith("stopped"):
                last[spec] = (hidden, args.cap)
            rows.append(row)
    write_report(args.output, report(rows, args, argv if argv is not None else sys.argv[1:]))


def report(rows, args, argv) -> str:
    tokens = args.samples * args.seqlen
    lines = [
        "# Cost at scale: one decoder layer of real shapes\n",
        f"Command: `python benchmarks/scaling.py {' '.join(argv)}`\n",
        f"Random-weight decoder layers (fp32, {args.layers} per model), calibration {args.samples} x {args.seqlen} = "
        f"{tokens} tokens, batch {args.batch_size}, device {args.device}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Times are per decoder layer; on a GPU the memory columns compare the allocator's peak with the estimate for "
        "that device. `statistics` = the hooked pass that accumulates the inputs' statistics, "
        "`solve` = the method, `forward` = the re-run that feeds the next layer. Memory: the process's peak RSS, "
        "the libraries and the weights measured before the prune, and `Pruner.plan`'s estimate of the peak made "
        "before it.\n",
        "| shape (hidden / MLP) | method | forward s | statistics s | solve s | prune s | peak RSS MB | "
        "libraries + weights MB | estimated peak MB | estimate / peak | estimated s (statistics / solve) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        family, hidden, inter, _, _ = SHAPES[row["shape"]]
        name = f"{hidden} / {inter}" + (" (Qwen2, biases)" if family == "qwen2" else "")
        if "error" in row:
            lines.append(f"| {name} | {row['spec']} | - | - | - | {row['error']} | - | - | - | - | - |")
            continue
        ph = row["phases"]
        on_gpu = bool(row.get("cuda_peak_mb"))
        estimate = (sum(v for d, v in row["estimate_mb"].items() if d.startswith("cuda")) if on_gpu
                    else row["estimate_mb"].get("cpu", 0.0))
        measured = row["cuda_peak_mb"] if on_gpu else row["peak_rss_mb"]
        lines.append(
            f"| {name} | {row['spec']} | {row['forward_s']:.2f} | {ph.get('statistics', 0):.2f} | {ph.get('solve', 0):.2f} | "
            f"{row['prune_s']:.2f} | {row['peak_rss_mb']:.0f} | {row['libraries_mb'] + row['weights_mb']:.0f} | "
            f"{estimate:.0f} | {estimate / measured:.2f} | {row['estimate_s']:.1f} "
            f"({row['estimate_phases'].get('statistics', 0):.1f} / {row['estimate_phases'].get('solve', 0):.1f}) |")
    lines += ["", "## Fitted growth of the solve with the hidden width (LLaMA shapes)", "",
              "`solve s = c * hidden^k` (least squares in log-log over the LLaMA shapes measured; the MLP width grows "
              "with the hidden width, 2.7x-4x).", "", "| method | k | points | projected solve s per layer at 8192 |",
              "|---|---|---|---|"]
    fits = {}
    for spec in dict.fromkeys(r["spec"] for r in rows):
        points = [(SHAPES[r["shape"]][1], r["phases"].get("solve", 0.0)) for r in rows
                  if r["spec"] == spec and r["shape"] in LLAMA_SHAPES and "error" not in r]
        fitted = fit(points)
        fits[spec] = fitted
        if fitted:
            c, k = fitted
            lines.append(f"| {spec} | {k:.2f} | {len(points)} | {c * 8192 ** k:.0f} |")
        else:
            lines.append(f"| {spec} | - | {len(points)} | - |")
    lines += projection(rows, fits, args)
    return "\n".join(lines) + "\n"


GPU_FLOPS = 50e12  # assumed sustained float32 matmul rate of one H100/H200 (no TF32), for the projection
PROJECT_TOKENS = 128 * 2048  # calibration tokens of the projected prunes (128 windows of 2048)


def meta_engine(args, spec: str, config):
    """A `LayerwiseEngine` for ``spec`` over a one-layer model of ``config`` with meta weights (nothing
    allocated): what the plan-only run sees."""
    import transformers

    from optimum_prune import Pruner
    from optimum_prune.engine.layerwise import LayerwiseEngine

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    pruner = Pruner(row_config(args, spec))
    return LayerwiseEngine(model, pruner.config, pruner.method, progress=False)


def busiest_share(args, spec: str, hidden: int, inter: int, heads: int, kv: int) -> float:
    """The busiest of `PROCESSES` processes' share of one LLaMA layer's solve operations, as the engine
    cuts that layer into pieces and assigns them (`engine.cost.solve_share`, what ``--dry-run`` prints)."""
    import transformers

    from optimum_prune.engine.cost import solve_share

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                                      num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=1)
    return solve_share(meta_engine(args, spec, config), PROCESSES)


def projection(rows, fits, args) -> list[str]:
    """Whole-model time per method, projected from the per-layer rows: statistics and forward
    scale with the layer's weights (times the layer count), the solve with the fitted exponent;
    on GPUs every phase is divided by the GPU/this-device matmul rate ratio, and with 8 processes
    the statistics and forward passes by 8 and the solve by the busiest process's share of it."""
    measured = [r for r in rows if "error" not in r and r["shape"] in LLAMA_SHAPES]
    if not measured:
        return []
    rate = sum(r["gemm_gflops"] for r in measured) / len(measured) * 1e9
    lines = ["", "## Projection to full models (not measured)", "",
             f"Per method: `layers x (passes + solve)`; passes (statistics + forward) scale with the layer's weights and "
             f"the calibration tokens ({PROJECT_TOKENS:,}: 128 windows of 2048) from the widest row measured, the solve with `c * hidden^k` above. GPU columns divide by the ratio of an "
             f"assumed {GPU_FLOPS / 1e12:.0f} TFLOP/s float32 GPU to the {rate / 1e9:.0f} GFLOP/s measured here; 8 GPUs "
             "(8 processes) divide the passes by 8 and the solve by the busiest process's share of each layer's "
             "solve (`share`: the engine's cut and assignment of the layer's pieces by the method's operation "
             "counts, as `--dry-run` prints it; a method whose rows do not separate keeps a layer's four stacked "
             "problems whole, so the largest one bounds it). Hours.", "",
             "| method | " + " | ".join(f"{m} here | {m} 1 GPU | {m} 8 GPUs | share" for m in FULL_MODELS) + " |",
             "|---|" + "---|---|---|---|" * len(FULL_MODELS)]
    for spec, fitted in fits.items():
        mine = [r for r in measured if r["spec"] == spec]
        if not fitted or not mine or parse_spec(spec)[2]:  # rows cut short do not project a full prune
            continue
        widest = max(mine, key=lambda r: SHAPES[r["shape"]][1])
        _, h0, i0, _, _ = SHAPES[widest["shape"]]
        passes0 = widest["phases"].get("statistics", 0.0) + widest["phases"].get("forward", 0.0)
        cells = []
        for hidden, inter, layers, heads, kv in FULL_MODELS.values():
            tokens = PROJECT_TOKENS / (args.samples * args.seqlen)
            passes = passes0 * tokens * (hidden * (hidden + inter)) / (h0 * (h0 + i0))
            solve = fitted[0] * hidden ** fitted[1]
            here = layers * (passes + solve) / 3600
            gpu = here * rate / GPU_FLOPS
            share = busiest_share(args, spec, hidden, inter, heads, kv)
            eight = layers * (passes / PROCESSES + solve * share) / 3600 * rate / GPU_FLOPS
            cells += [f"{here:.1f}", f"{gpu:.2f}", f"{eight:.2f}", f"{share:.2f}"]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return lines + moe_projection(args)


def moe_projection(args) -> list[str]:
    """A DeepSeek-V3-shaped prune from the plan's operation counts alone (no row of this shape ran):
    the statistics passes, solves and forwards of one MoE layer (`engine.cost.estimate_phases`) at the
    assumed GPU rate, times the layer count; on one GPU with its experts' statistics in the chunks that
    fit `GPU_MEMORY` beside the rest of the layer (`engine.resources.layer_parts`), on 8 GPUs with the
    windows and each layer's solves shared."""
    import transformers

    from optimum_prune.engine import cost, resources

    config = transformers.DeepseekV3Config(**DEEPSEEK_V3)
    windows, seqlen = PROJECT_TOKENS // 2048, 2048
    lines = ["", "### DeepSeek-V3-shaped (not measured: the plan's operation counts)", "",
             f"One MoE layer of DeepSeek-V3's shape (7168 hidden, 256 routed experts of 2048 channels and one shared, "
             f"MLA attention; bfloat16 weights, meta device), {PROJECT_TOKENS:,} calibration tokens, times "
             f"{DEEPSEEK_LAYERS} layers, at the assumed {GPU_FLOPS / 1e12:.0f} TFLOP/s. Expert chunks: the experts "
             f"whose statistics fit a {GPU_MEMORY / 1e9:.0f} GB GPU beside the rest of the layer "
             f"(`resources.expert_chunk`), each chunk one more statistics pass. Hours; `share` = the busiest of 8 "
             f"processes' share of a layer's solve.", "",
             "| method | expert statistics per layer GB | experts per pass (80 GB) | passes per layer | 1 GPU h | "
             "8 GPUs h | share |", "|---|---|---|---|---|---|---|"]
    for spec in ("wanda:0.5", "sparsegpt:0.5", "alps:0.5", "fista:0.5"):
        engine = meta_engine(args, spec, config)
        _, parts, (experts, per_expert) = resources.layer_parts(engine, 0, windows, seqlen)
        activations = sum(resources.activation_bytes(engine, windows, seqlen, torch.device("cpu")).values())
        room = GPU_MEMORY - sum(parts.values()) - activations
        engine.expert_chunk = max(1, min(experts, int(room // per_expert))) if per_expert else None
        passes = cost.expert_passes(engine, 0)
        hours = []
        for processes in (1, PROCESSES):
            flops = cost.estimate_phases(engine, windows, seqlen, processes)
            hours.append(DEEPSEEK_LAYERS * sum(flops.values()) / GPU_FLOPS / 3600)
        lines.append(f"| {spec} | {experts * per_expert / 1e9:.1f} | {engine.expert_chunk or experts} of {experts} | "
                     f"{passes} | {hours[0]:.1f} | {hours[1]:.2f} | {cost.solve_share(engine, PROCESSES):.3f} |")
    return lines


if __name__ == "__main__":
    main()
