"""Global structured pruning by policy gradient: keep-probabilities for every MLP channel and KV
group of the model learned with forward passes only; every layer ends up with its own width. The
saved model loads with `from_pretrained` after `import optimum_prune` (or with
`trust_remote_code=True` without it).

    python examples/global_policy_gradient.py --sparsity 0.2 --steps 50 --output outputs/smollm2-pg-20
"""

import tempfile

from _common import CALIBRATION, load, parser, ppl

import optimum_prune  # noqa: F401  registers the classes of heterogeneous pruned models
from optimum_prune import Pruner, PruningConfig
from optimum_prune.structure.shrink import layer_widths


def main():
    p = parser(__doc__)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget", default="global", choices=["global", "separate"])
    args = p.parse_args()

    model, tokenizer = load()
    print(f"dense perplexity: {ppl(model, tokenizer, args):.2f}")
    config = PruningConfig(method="policy_gradient", pattern="structured", sparsity=args.sparsity,
                           num_calibration_samples=args.num_samples, seqlen=args.seqlen, dataset=CALIBRATION,
                           method_kwargs={"steps": args.steps, "budget": args.budget})
    pruner = Pruner(config)
    pruner.prune(model, tokenizer=tokenizer)
    print(f"perplexity: {ppl(model, tokenizer, args):.2f}")
    print("MLP width per layer:", [w["intermediate_size"] for w in layer_widths(model)])
    output = args.output or tempfile.mkdtemp()
    pruner.save_pretrained(output, overwrite=True)

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(output)
    print(f"reloaded from {output} as {type(reloaded).__name__}")


if __name__ == "__main__":
    main()
