"""Pruning the experts of a mixture-of-experts model with real weights (issue #23).

No MoE ships in the packages reachable here, so this script builds one from SmolLM2-135M
(MoEfication): in every decoder layer the MLP's 1536 channels are split into ``--experts`` experts
of co-activating channels (balanced k-means on the channels' activation patterns over calibration
tokens), and a router is fit by least squares to predict the norm of each expert's contribution
from the MLP input. The result is a stock transformers ``MixtralForCausalLM`` — SmolLM2's
attention, norms and embeddings, 8 fused experts per layer, top-``--top-k`` routing — which
computes SmolLM2's MLP restricted to the channels of the chosen experts. The router's logits are
scaled by a small temperature so that Mixtral's renormalised top-k weights are ~1/k, and each
expert's down projection is multiplied by k to compensate. It is cached (``--cache``) and built
from calibration windows of seed 1, apart from the pruning calibration (seed 0 onwards).

Then, each configuration in its own process: perplexity of the dense MoE and after pruning 50% of
the experts' weights (attention left dense) with magnitude, Wanda, SparseGPT and ALPS, each expert
solved on the tokens routed to it (and SparseGPT with ``expert_calibration="all"``), on two
held-out texts: the evaluation split of the packaged Wikipedia leads and the Python reference
(stdlib ``pydoc_data.topics``).

    python benchmarks/moe.py                                   # -> docs/results/moe.md
    python benchmarks/moe.py --runs sparsegpt wanda --seeds 0   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm2 import in_process, peak_rss_mb  # noqa: E402


RUNS = ["magnitude", "wanda", "sparsegpt", "sparsegpt[all]", "alps"]
TEXTS = {"wiki": "packaged:wiki-leads-eval", "python": "pydoc"}
TEMPERATURE = 1e-3


def python_reference() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]


def _text(name: str):
    return python_reference() if TEXTS[name] == "pydoc" else TEXTS[name]


def _balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` (unit norm) into ``clusters`` groups of equal size; returns
    the group of each row. Assignment: the most similar (row, centroid) pairs first, within capacity."""
    rows = features.shape[0]
    capacity = rows // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(rows, generator=generator)[:clusters]]
    for _ in range(iterations):
        similarity = features @ centroids.T  # rows x clusters
        order = similarity.flatten().argsort(descending=True).tolist()
        chosen, room = [-1] * rows, [capacity] * clusters
        for flat in order:
            row, cluster = divmod(flat, clusters)
            if chosen[row] < 0 and room[cluster] > 0:
                chosen[row] = cluster
                room[cluster] -= 1
        assign = torch.tensor(chosen)
        centroids = torch.stack([features[assign == c].mean(0) for c in range(clusters)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return assign


@torch.no_grad()
def build_moe(checkpoint: str, folder: str, experts: int, top_k: int, samples: int, seqlen: int, tokens: int) -> dict:
    """MoEfy SmolLM2 into ``folder`` (a Mixtral checkpoint); returns what was built."""
    import transformers

    from optimum_prune.calibration.data import calibration_windows

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    cfg = model.config
    windows = calibration_windows("packaged:wiki-leads", tokenizer, samples, seqlen, seed=1)
    inputs = {i: [] for i in range(cfg.num_hidden_layers)}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
               for i, layer in enumerate(model.model.layers)]
    for batch in windows.split(8):
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    width = cfg.intermediate_size // experts
    moe_config = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    generator = torch.Generator().manual_seed(0)
    router_fit = []
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(inputs[i])
        x = x[torch.randperm(x.shape[0], generator=generator)[:tokens]]
        mlp = layer.mlp
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # tokens x 1536
        features = act.abs().T
        features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        groups = _balanced_kmeans(features, experts, seed=i)
        channels = [torch.nonzero(groups == e).squeeze(1) for e in range(experts)]
        # what each expert adds to the MLP output, per token: the router learns to predict its norm
        scores = torch.stack([(act[:, ch] @ mlp.down_proj.weight[:, ch].T).norm(dim=1) for ch in channels], dim=1)
        xb = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        ridge = 1e-3 * xb.square().mean() * torch.eye(xb.shape[1])
        weight = torch.linalg.solve(xb.T @ xb + ridge, xb.T @ scores).T[:, :-1]  # experts x hidden (bias dropped)
        chosen = (x @ weight.T).topk(top_k, dim=1).indices
        best = scores.topk(top_k, dim=1).indices
        router_fit.append(float((chosen.unsqueeze(2) == best.unsqueeze(1)).any(2).float().mean()))
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.gate.weight"] = TEMPERATURE * weight
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mlp.gate_proj.weight[ch], mlp.up_proj.weight[ch]]) for ch in channels])
        state[f"{prefix}.experts.down_proj"] = torch.stack([top_k * mlp.down_proj.weight[:, ch] for ch in channels])
        inputs[i] = None
    moe = transformers.MixtralForCausalLM(moe_config).eval()
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    moe.tie_weights()
    os.makedirs(folder, exist_ok=True)
    moe.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"experts": experts, "top_k": top_k, "expert_width": width, "build_windows": samples, "build_seqlen": seqlen,
            "tokens_per_layer": tokens, "router_top_k_overlap": sum(router_fit) / len(router_fit),
            "temperature": TEMPERATURE}
    with open(os.path.join(folder, "moefication.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    return info


def _evaluate(model, tokenizer, args) -> dict:
    from optimum_prune.evaluation import perplexity

    return {name: perplexity(model, tokenizer, _text(name), seqlen=args.seqlen, max_windows=args.eval_windows)
            for name in TEXTS}


def _dense(args, queue):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.moe, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.moe)
    smol = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    queue.put({"moe": _evaluate(model, tokenizer, args), "smollm2": _evaluate(smol, tokenizer, args)})


def _prune(args, run, seed, queue):
    import transformers

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration.data import calibration_windows

    model = transformers.AutoModelForCausalLM.from_pretrained(args.moe, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.moe)
    method, _, mode = run.partition("[")
    config = PruningConfig(method=method, sparsity=0.5, num_calibration_samples=args.num_samples, seqlen=args.seqlen,
                           seed=seed, ignore=["*self_attn*"], expert_calibration=mode.rstrip("]") or "routed",
                           method_kwargs={"max_iter": 100} if method == "alps" else {})
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, seed)
    pruner = Pruner(config)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False)
    seconds = time.perf_counter() - start
    banks = [p for n, p in model.named_parameters() if ".experts." in n]
    zeros = sum(int((p == 0).sum()) for p in banks) / sum(p.numel() for p in banks)
    report = pruner.report
    queue.put({"run": run, "seed": seed, "ppl": _evaluate(model, tokenizer, args), "prune_s": seconds,
               "expert_sparsity": zeros, "expert_matrices": report.expert_matrices,
               "fallbacks": sum(report.expert_fallbacks.values()), "peak_rss_mb": peak_rss_mb()})


def _mean_spread(values):
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def write_results(path, args, info, dense, rows):
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    lines = [
        "# Pruning the experts of a mixture-of-experts model (SmolLM2 MoEfied)",
        "",
        "Written by `python benchmarks/moe.py` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; each run alone in its own "
        "process, nothing else running).",
        "",
        f"**The model.** No MoE ships in the packages reachable here; this one is built from SmolLM2-135M-Instruct "
        f"(MoEfication, see the script's docstring): every layer's 1536 MLP channels split into {info['experts']} "
        f"experts of {info['expert_width']} co-activating channels, a least-squares router, top-{info['top_k']} "
        f"routing — a stock `MixtralForCausalLM` with real weights. The router picks, on average over the layers, "
        f"{info['router_top_k_overlap']:.0%} of the top-{info['top_k']} experts by actual contribution (on its "
        f"build tokens). Built from {info['build_windows']} x {info['build_seqlen']} calibration tokens of seed 1.",
        "",
        f"Perplexity over the first {args.eval_windows} windows x {args.seqlen} tokens of each held-out text: "
        "`wiki` = the evaluation split of the packaged Wikipedia leads, `python` = the Python reference "
        "(stdlib `pydoc_data.topics`, never seen in calibration).",
        "",
        "| model | wiki | python |",
        "|---|---|---|",
        f"| SmolLM2-135M (dense, the source) | {dense['smollm2']['wiki']:.2f} | {dense['smollm2']['python']:.2f} |",
        f"| MoE (dense) | {dense['moe']['wiki']:.2f} | {dense['moe']['python']:.2f} |",
        "",
        f"**Unstructured 50% of the experts' weights** (attention left dense, routers never pruned), "
        f"{args.num_samples} calibration windows x {args.seqlen} tokens of the Wikipedia calibration split; "
        f"calibration seeds {', '.join(map(str, args.seeds))}: mean ± half the range over seeds. Each expert is "
        f"solved as its own problem on the tokens routed to it; `[all]` = `expert_calibration=\"all\"` (every token).",
        "",
        "| method | wiki | x dense MoE | python | x dense MoE | expert sparsity | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, items in by_run.items():
        wiki = _mean_spread([r["ppl"]["wiki"] for r in items])
        python = _mean_spread([r["ppl"]["python"] for r in items])
        seconds = sum(r["prune_s"] for r in items) / len(items)
        rss = max(r["peak_rss_mb"] for r in items)
        lines.append(
            f"| {run} | {wiki[0]:.2f} ± {wiki[1]:.2f} | {wiki[0] / dense['moe']['wiki']:.2f} | "
            f"{python[0]:.2f} ± {python[1]:.2f} | {python[0] / dense['moe']['python']:.2f} | "
            f"{items[0]['expert_sparsity']:.4f} | {seconds:.0f} | {rss:.0f} |")
    lines += ["", "Raw rows:", "", "```json", *(json.dumps(r) for r in rows), "```", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--build-tokens", type=int, default=4096, help="tokens per layer for clustering and router fit")
    parser.add_argument("--cache", default=None, help="where the MoE is kept (default: the package cache folder)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results", "moe.md"))
    args = parser.parse_args()
    from optimum_prune.assets import cache_dir, smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    args.moe = args.cache or os.path.join(cache_dir(), f"smollm2-moe-{args.experts}x-top{args.top_k}")
    if not os.path.isfile(os.path.join(args.moe, "moefication.json")):
        print(f"building the MoE in {args.moe}", flush=True)
        build_moe(args.checkpoint, args.moe, args.experts, args.top_k, 64, args.seqlen, args.build_tokens)
    with open(os.path.join(args.moe, "moefication.json")) as handle:
        info = json.load(handle)
    print(json.dumps(info), flush=True)
    dense = in_process(_dense, args)
    print(json.dumps(dense), flush=True)
    rows = []
    for seed in args.seeds:
        for run in args.runs:
            rows.append(in_process(_prune, args, run, seed))
            print(json.dumps(rows[-1]), flush=True)
            write_results(args.output, args, info, dense, rows)
    write_results(args.output, args, info, dense, rows)


if __name__ == "__main__":
    main()
