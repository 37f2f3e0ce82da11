"""2:4 semi-structured sparsity (two non-zeros in every four weights: NVIDIA sparse tensor cores),
compared for Wanda, SparseGPT and ALPS on SmolLM2-135M.

    python examples/semi_structured_2_4.py --methods wanda sparsegpt alps
"""

from _common import CALIBRATION, load, parser, ppl

from optimum_prune import Pruner, PruningConfig
from optimum_prune.methods import satisfies_nm


def main():
    p = parser(__doc__)
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "alps"])
    args = p.parse_args()
    rows = []
    for method in args.methods:
        model, tokenizer = load()
        pruner = Pruner(PruningConfig(method=method, pattern="2:4", num_calibration_samples=args.num_samples,
                                      seqlen=args.seqlen, dataset=CALIBRATION))
        pruner.prune(model, tokenizer=tokenizer)
        exact = all(satisfies_nm(m.weight, 2, 4) for n, m in model.named_modules()
                    if n.startswith("model.layers.") and hasattr(m, "weight") and m.weight.dim() == 2)
        rows.append((method, ppl(model, tokenizer, args), pruner.report.seconds, exact))
    print("| method | perplexity | prune time (s) | every row 2:4 |\n|---|---|---|---|")
    for method, value, seconds, exact in rows:
        print(f"| {method} | {value:.2f} | {seconds:.0f} | {exact} |")


if __name__ == "__main__":
    main()
