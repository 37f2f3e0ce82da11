"""Structured pruning: SmolLM2-135M with 20% of its decoder parameters removed by FASP. The saved
model is a stock Llama checkpoint with a smaller intermediate size: fewer parameters, a smaller
file, faster inference.

    python examples/structured.py --method fasp --sparsity 0.2 --output outputs/smollm2-fasp-20
"""

import os
import tempfile

from _common import CALIBRATION, load, parser, ppl

from optimum_prune import Pruner, PruningConfig
from optimum_prune.evaluation.speed import measure_speed


def size_mb(folder):
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")) / 2**20


def main():
    args = parser(__doc__, "fasp", "magnitude, wanda-sp, fasp, spap, sparsefw", sparsity=0.2).parse_args()

    model, tokenizer = load()
    before = {"params": sum(q.numel() for q in model.parameters()), "ppl": ppl(model, tokenizer, args),
              "speed": measure_speed(model, prompt_length=256, new_tokens=16, repeats=3)}
    pruner = Pruner(PruningConfig(method=args.method, pattern="structured", sparsity=args.sparsity,
                                  num_calibration_samples=args.num_samples, seqlen=args.seqlen, dataset=CALIBRATION))
    pruner.prune(model, tokenizer=tokenizer)
    after = {"params": sum(q.numel() for q in model.parameters()), "ppl": ppl(model, tokenizer, args),
             "speed": measure_speed(model, prompt_length=256, new_tokens=16, repeats=3)}
    output = args.output or tempfile.mkdtemp()
    pruner.save_pretrained(output, overwrite=True)
    print(f"intermediate_size {model.config.intermediate_size}; saved {size_mb(output):.0f} MB to {output}")
    for name, row in (("dense", before), ("pruned", after)):
        print(f"{name}: {row['params']:,} parameters, perplexity {row['ppl']:.2f}, "
              f"prefill {row['speed'].prefill_tokens_per_s:.0f} tok/s, decode {row['speed'].decode_ms_per_token:.1f} ms/token")


if __name__ == "__main__":
    main()
