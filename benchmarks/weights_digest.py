"""SHA-256 of the pruned weights for a few configurations: run it on two commits and compare, to show
that a refactor leaves every weight bit-identical (issue #22).

    python benchmarks/weights_digest.py > after.json             # tiny random LLaMA (seconds)
    python benchmarks/weights_digest.py --model packaged:smollm2-135m --num-samples 16 > after.json
    git stash; python benchmarks/weights_digest.py ... > before.json; git stash pop; diff before.json after.json
"""

from __future__ import annotations

import hashlib
import json

import torch

from harness import parser as harness_parser
import transformers

from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration.data import calibration_windows


CONFIGS = {
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "fista-50-error-correction": dict(method="fista", sparsity=0.5, method_kwargs={"iterations": 10, "rounds": 1}),
    "fasp-30-structured": dict(method="fasp", pattern="structured", sparsity=0.3),
    "wanda-50-one-pass": dict(method="wanda", sparsity=0.5, sequential=False),
}
# cheap on the tiny model; --all adds them on a real one
MORE = {
    "alps-50": dict(method="alps", sparsity=0.5, method_kwargs={"max_iter": 30}),
    "spap-30-structured": dict(method="spap", pattern="structured", sparsity=0.3),
    "policy-gradient-30": dict(method="policy_gradient", pattern="structured", sparsity=0.3,
                               method_kwargs={"steps": 6, "samples": 2}),
    "policy-gradient-30-spap-finish": dict(method="policy_gradient", pattern="structured", sparsity=0.3,
                                           method_kwargs={"steps": 6, "samples": 2, "local_method": "spap"}),
}
# tiny-model only: the other kinds of work (issue #38) — a sparsity profile, experts pruned, removed, narrowed
TINY = {
    "sparsegpt-50-owl": dict(method="sparsegpt", sparsity=0.5, sparsity_profile="owl"),
    "sparsegpt-50-experts": dict(method="sparsegpt", sparsity=0.5, model="qwen2_moe"),
    "expert-drop-50": dict(method="expert-drop", pattern="structured", sparsity=0.5, model="mixtral"),
    "fasp-30-narrowed-experts": dict(method="fasp", pattern="structured", sparsity=0.3, model="qwen2_moe"),
}


def tiny_model(family: str = "llama"):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2)
    else:
        config = transformers.LlamaConfig(**common)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), None


def digest(model) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def main():
    parser = harness_parser(__doc__.splitlines()[0], seqlen=64, samples=8)
    parser.add_argument("--model", default=None, help="A model to load (default: a tiny random LLaMA).")
    parser.add_argument("--only", nargs="*", default=None, help="Names of the configurations to run.")
    parser.add_argument("--all", action="store_true", help="Also the MORE configurations with --model.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-exact across runs: one thread
    results = {}
    configs = {**CONFIGS, **(MORE if args.all or not args.model else {}), **({} if args.model else TINY)}
    for name, options in configs.items():
        options = dict(options)
        family = options.pop("model", "llama")
        if args.only and name not in args.only:
            continue
        if args.model:
            from optimum_prune.pruner import load_model

            model, tokenizer = load_model(args.model, dtype=torch.float32)
            data = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, 0)
        else:
            model, tokenizer = tiny_model(family)
            data = torch.randint(0, 256, (args.num_samples, args.seqlen), generator=torch.Generator().manual_seed(0))
        config = PruningConfig(num_calibration_samples=args.num_samples, seqlen=args.seqlen, **options)
        Pruner(config).prune(model, data, progress=False)
        results[name] = digest(model)
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
