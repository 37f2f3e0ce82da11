"""Is a structurally pruned model really faster and smaller? Dense vs pruned SmolLM2-135M, same run.

Each structured level is pruned with FASP (16 x 512 calibration tokens: the speed of a model does
not depend on how well its channels were chosen) and saved; then every model, dense included, is
loaded in a fresh process and measured with `optimum_prune.evaluation.speed.measure_speed`:
prefill throughput (batch x 512 tokens, last logits only), per-token greedy decode latency with
the KV cache, parameter count, weight memory, safetensors size and the process's peak memory.

    python benchmarks/speed.py                     # CPU, writes docs/results/speed.md
    python benchmarks/speed.py --device cuda --output docs/results/speed-cuda.md
"""

from __future__ import annotations

import json
import os
import platform
import tempfile

import torch
from harness import add_speed_arguments, in_process, parser as harness_parser, speed_of, write_report


LEVELS = [0.2, 0.3, 0.38]  # 0.38 of the decoder-layer parameters is 30% of all parameters of SmolLM2-135M


def _prune_and_save(checkpoint, sparsity, folder, queue):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    windows = calibration_windows("packaged:wiki-leads", tokenizer, 16, 512, 0)
    pruner = Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=sparsity, num_calibration_samples=16))
    pruner.prune(model, windows, progress=False)
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    queue.put(pruner.report.overall_sparsity)


def main():
    parser = harness_parser(__doc__, output="speed.md")
    parser.add_argument("--levels", type=float, nargs="+", default=LEVELS)
    add_speed_arguments(parser)
    args = parser.parse_args()

    from optimum_prune.assets import smollm2_checkpoint

    checkpoint = smollm2_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [("dense", 0.0, checkpoint)]
        for level in args.levels:
            folder = os.path.join(tmp, f"fasp-{level}")
            achieved = in_process(_prune_and_save, checkpoint, level, folder)
            folders.append((f"fasp structured {level:.0%}", achieved, folder))
        for label, achieved, folder in folders:
            row = {"model": label, "decoder_sparsity": achieved, **in_process(speed_of, folder, args)}
            print(json.dumps(row), flush=True)
            rows.append(row)

    dense = rows[0]
    lines = [
        f"SmolLM2-135M-Instruct fp32 on {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}). Prefill: batch {args.batch_size} x "
        f"{args.prompt_length} tokens; decode: {args.new_tokens} greedy one-token steps through the KV cache after that prompt; median of "
        f"{args.repeats} runs. Peak memory: {'CUDA max allocated' if args.device.startswith('cuda') else 'process max RSS'}, "
        "each model in its own process.\n",
        "| model | decoder params removed | parameters | params / dense | weight MB | weight / dense | safetensors MB | "
        "prefill tok/s | prefill speed-up | decode ms/token | decode speed-up | peak memory MB | peak / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['decoder_sparsity']:.1%} | {row['parameters']:,} | "
            f"{row['parameters'] / dense['parameters']:.3f} | {row['weight_mb']:.1f} | {row['weight_mb'] / dense['weight_mb']:.3f} | "
            f"{row['disk_mb']:.1f} | {row['prefill_tokens_per_s']:.0f} | "
            f"{row['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x | {row['decode_ms_per_token']:.2f} | "
            f"{dense['decode_ms_per_token'] / row['decode_ms_per_token']:.2f}x | {row['peak_memory_mb']:.0f} | "
            f"{row['peak_memory_mb'] / dense['peak_memory_mb']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_report(args.output, f"# Speed and size of structurally pruned SmolLM2-135M\n\nCommand: `python benchmarks/speed.py"
                              f"{'' if args.device == 'cpu' else ' --device ' + args.device}`\n\n{table}", echo=False)


if __name__ == "__main__":
    main()
