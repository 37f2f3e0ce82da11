"""Global structured pruning by policy gradient: every layer ends up with its own width, decided
with forward passes only. The configuration is the one measured best on SmolLM2-135M
(docs/methods/policy_gradient.md): one budget over the MLP channels, a start measured per layer
(`init_scope="sensitivity"`), policy-gradient steps, and SPAP choosing and restoring the channels at
the learned widths. The saved model loads with `from_pretrained` after `import optimum_prune` (or
with `trust_remote_code=True` without it).

    python examples/global_policy_gradient.py --sparsity 0.2 --steps 50 --output outputs/smollm2-pg-20
"""

import tempfile

from _common import CALIBRATION, load, parser, ppl

import optimum_prune  # noqa: F401  registers the classes of heterogeneous pruned models
from optimum_prune import Pruner, PruningConfig
from optimum_prune.structure.shrink import layer_widths


def main():
    p = parser(__doc__, sparsity=0.2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget", default="global", choices=["global", "separate"])
    p.add_argument("--init-scope", default="sensitivity", choices=["sensitivity", "budget", "group"],
                   help="where each layer's width starts (sensitivity: measured with forward passes)")
    p.add_argument("--local-method", default="spap", help="spap, fasp, wanda-sp, or none (most probable units)")
    args = p.parse_args()

    model, tokenizer = load()
    print(f"dense perplexity: {ppl(model, tokenizer, args):.2f}")
    config = PruningConfig(method="policy_gradient", pattern="structured", sparsity=args.sparsity,
                           num_calibration_samples=args.num_samples, seqlen=args.seqlen, dataset=CALIBRATION,
                           ignore=["*.self_attn"],  # SmolLM2 has 3 KV groups per layer: too coarse to trade
                           method_kwargs={"steps": args.steps, "budget": args.budget, "init_scope": args.init_scope,
                                          "local_method": None if args.local_method == "none" else args.local_method})
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
