"""Unstructured sparsity: SmolLM2-135M at 50% with SparseGPT, perplexity before and after, saved.

    python examples/unstructured.py --method sparsegpt --sparsity 0.5 --output outputs/smollm2-sparsegpt-50
"""

from _common import CALIBRATION, load, parser, ppl

from optimum_prune import Pruner, PruningConfig


def main():
    args = parser(__doc__, "sparsegpt", "magnitude, wanda, sparsegpt, alps, fista, sparsefw", sparsity=0.5).parse_args()

    model, tokenizer = load()
    print(f"dense perplexity: {ppl(model, tokenizer, args):.2f}")
    config = PruningConfig(method=args.method, sparsity=args.sparsity, num_calibration_samples=args.num_samples,
                           seqlen=args.seqlen, dataset=CALIBRATION)
    pruner = Pruner.from_config(config)
    pruner.prune(model, tokenizer=tokenizer)  # calibration text: config.dataset
    print(f"sparsity {pruner.report.overall_sparsity:.4f} in {pruner.report.seconds:.0f}s; "
          f"perplexity {ppl(model, tokenizer, args):.2f}")
    if args.output:
        pruner.save_pretrained(args.output)  # loads with AutoModelForCausalLM.from_pretrained
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
