"""How many iterations the iterative solvers run on SmolLM2-135M's real layer problems.

ALPS stops once its support is stable, SparseFW once its duality gap is small; `Pruner.plan`'s
time estimate (`PruningMethod.solve_flops`) needs the typical count, not the ``max_iter`` bound.
This script accumulates the Gram matrices of the dense model's inputs to every Linear of a few
decoder layers (``--windows`` x 512 tokens of the packaged Wikipedia leads), stacks the Linears
that read one tensor as the engine does (q/k/v, gate/up), solves each problem at ``--sparsity``
with each method's default options and prints the iterations run.

    python benchmarks/iterations.py
    python benchmarks/iterations.py --layers 0 15 29 --sparsity 0.5
"""

from __future__ import annotations

import argparse
import statistics

import torch

GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def layer_problems(model, windows, layers):
    """{(layer, group): (stacked weight, damped Gram matrix, row sizes, input norms)} from one dense pass,
    damped as the engine damps them (`prepare_hessian`, the default dampening 0.01)."""
    from optimum_prune.calibration.statistics import InputStatistics
    from optimum_prune.methods.linalg import prepare_hessian

    stats, handles = {}, []
    decoder = model.model.layers
    for index in layers:
        for group, names in GROUPS.items():
            module = decoder[index].get_submodule(names[0])
            stats[(index, group)] = InputStatistics(module.in_features, {"gram", "sq_norm"})
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, s=stats[(index, group)]: s.update(args[0])))
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    problems = {}
    for (index, group), stat in stats.items():
        weights = [decoder[index].get_submodule(name).weight.detach() for name in GROUPS[group]]
        H, W = prepare_hessian(stat.gram, torch.cat(weights, 0), 0.01)
        problems[(index, group)] = (W, H, [w.shape[0] for w in weights], stat.input_norm)
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 15, 29])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune.assets import smollm2_checkpoint
    from optimum_prune.calibration.data import calibration_windows
    from optimum_prune.methods.alps import ALPSOptions, alps_solve
    from optimum_prune.methods.sparsefw import SparseFWOptions, sparsefw_solve
    from optimum_prune.patterns import SparsityPattern, Target

    path = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.windows, 512, 0)
    problems = layer_problems(model, windows, args.layers)
    target = Target(args.sparsity, SparsityPattern.parse("unstructured"))
    alps_options, fw_options = ALPSOptions(), SparseFWOptions()
    counts = {"alps": [], "sparsefw": []}
    print(f"| layer | Linears | rows x cols | ALPS ADMM iterations (max {alps_options.max_iter}) | "
          f"SparseFW iterations (max {fw_options.iterations}) |")
    print("|---|---|---|---|---|")
    for (index, group), (W, H, sizes, norm) in problems.items():
        alps_history, fw_history = [], []
        alps_solve(W.clone(), H, target, alps_options, sizes, history=alps_history)
        sparsefw_solve(W.clone(), H, target, fw_options, sizes, input_norm=norm, history=fw_history)
        alps_it = alps_history[-1]["iteration"] if alps_history else 0
        fw_it = fw_history[-1]["iteration"] + 1 if fw_history else 0
        counts["alps"].append(alps_it)
        counts["sparsefw"].append(fw_it)
        print(f"| {index} | {group} | {W.shape[0]} x {W.shape[1]} | {alps_it} | {fw_it} |", flush=True)
    for name, values in counts.items():
        print(f"{name}: mean {statistics.mean(values):.1f}, max {max(values)} iterations over {len(values)} problems")


if __name__ == "__main__":
    main()
