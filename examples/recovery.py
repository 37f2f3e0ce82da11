"""Recovery with PEFT: prune SmolLM2-135M (Wanda 50% by default), then a short LoRA fine-tune on
the calibration text, merged back into the weights with the sparsity masks re-applied; perplexity
at every stage.

    python examples/recovery.py --method wanda --sparsity 0.5 --steps 60
    python examples/recovery.py --method fasp --pattern structured --sparsity 0.2
"""

from _common import CALIBRATION, load, parser, ppl

from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration.data import calibration_windows
from optimum_prune.recovery import LoraRecoveryConfig, recover_lora


def main():
    p = parser(__doc__, "wanda", pattern="unstructured", sparsity=0.5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args()

    model, tokenizer = load()
    print(f"dense perplexity: {ppl(model, tokenizer, args):.2f}")
    pruner = Pruner(PruningConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity,
                                  num_calibration_samples=args.num_samples, seqlen=args.seqlen, dataset=CALIBRATION))
    pruner.prune(model, tokenizer=tokenizer)
    print(f"pruned perplexity: {ppl(model, tokenizer, args):.2f}")
    windows = calibration_windows(CALIBRATION, tokenizer, 256, args.seqlen, seed=1)  # other windows than calibration
    info = recover_lora(model, windows, LoraRecoveryConfig(steps=args.steps, lr=args.lr))
    print(f"recovered perplexity: {ppl(model, tokenizer, args):.2f} ({info['steps']} steps, {info['seconds']:.0f}s, "
          f"training loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}); sparsity kept: "
          f"{pruner.report.overall_sparsity:.4f}")
    if args.output:
        pruner.save_pretrained(args.output, results={"recovery": info})


if __name__ == "__main__":
    main()
