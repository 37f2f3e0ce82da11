"""Peak memory of pruning SmolLM2-135M in memory vs with accelerate disk offload.

The packaged GGUF checkpoint is first converted once to an fp32 safetensors folder (so that
loading can stream weights to the offload folder instead of de-quantising the whole model in
memory). Each run then loads that folder in its own process — in memory, or with
``device_map="auto"`` and a ``max_memory`` that leaves most weights on disk — prunes it with
SparseGPT 50% (EVAL.md calibration), and reports the process's peak RSS after the prune (load
included) and after saving, the prune time, and whether the saved weights equal the in-memory
run's.

    python benchmarks/offload_memory.py                 # -> docs/results/offload.md
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time

import torch
from harness import in_process, parser as harness_parser, write_report


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _convert(folder, queue):
    from optimum_prune.pruner import load_model

    model, tokenizer = load_model("packaged:smollm2-135m", dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    queue.put({"ok": True})


def _run(args, folder, mode, output, queue):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows

    base = _rss_mb()
    kwargs = {}
    if mode != "memory":
        kwargs = {"device_map": "auto", "max_memory": {"cpu": args.cpu_budget}, "offload_folder": output + "-offload"}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    placement = sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values()))
    loaded = _rss_mb()
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, 0)
    pruner = Pruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_calibration_samples=args.num_samples,
                                  seqlen=args.seqlen))
    start = time.perf_counter()
    activations = "disk" if mode == "offload+activations" else "device"
    folder = output + "-activations" if activations == "disk" else None
    pruner.prune(model, windows, progress=False, activations=activations, activation_folder=folder)
    seconds = time.perf_counter() - start
    pruned = _rss_mb()
    pruner.save_pretrained(output)
    queue.put({"mode": mode, "placement": placement, "activations": activations, "rss_imports": base, "rss_loaded": loaded, "rss_pruned": pruned,
               "rss_saved": _rss_mb(), "seconds": seconds})


def main():
    parser = harness_parser(__doc__, output="offload.md", seqlen=512, samples=64)
    parser.add_argument("--cpu-budget", default="150MB", help="accelerate max_memory for the CPU in the offload run")
    args = parser.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smollm2-fp32")
        in_process(_convert, folder)
        modes = ("memory", "offload", "offload+activations")
        rows = {mode: in_process(_run, args, folder, mode, os.path.join(tmp, mode)) for mode in modes}
        a = load_file(os.path.join(tmp, "memory", "model.safetensors"))
        max_diff = 0.0
        for mode in modes[1:]:
            b = load_file(os.path.join(tmp, mode, "model.safetensors"))
            max_diff = max(max_diff, max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
    base = rows["memory"]["rss_pruned"]
    lines = [
        f"| {r['mode']} | {', '.join(r['placement'])} | {r['activations']} | {r['rss_imports']:.0f} | "
        f"{r['rss_loaded']:.0f} | {r['rss_pruned']:.0f} | {r['rss_pruned'] / base:.2f}x | {r['rss_saved']:.0f} | "
        f"{r['seconds']:.0f} |" for r in rows.values()
    ]
    table = (
        f"SmolLM2-135M-Instruct converted to fp32 safetensors; SparseGPT 50%, calibration {args.num_samples} x "
        f"{args.seqlen} tokens; each run in its own process; offload run: `device_map=\"auto\"`, "
        f"`max_memory={{'cpu': '{args.cpu_budget}'}}`, the rest on disk; activations: where the calibration "
        f"hidden states wait between layers (`Pruner.prune(activations=...)`, `--activations`). Peak RSS is the process's maximum resident "
        f"set so far (`ru_maxrss`), after importing, after loading, after pruning and after saving. "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.\n\n"
        "| run | weights on | activations | peak RSS after imports (MB) | after load | after prune | "
        "/ in-memory | after save | prune time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Largest difference between an offloaded run's saved weights and the in-memory run's: {max_diff:.3g}.\n"
    )
    print(table)
    write_report(args.output, f"# Pruning with offload: peak memory\n\nCommand: `python benchmarks/offload_memory.py`\n\n{table}",
                 echo=False)


if __name__ == "__main__":
    main()
