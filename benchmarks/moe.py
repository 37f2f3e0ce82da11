"""Pruning the experts of a mixture-of-experts model with real weights (issue #23).

No MoE ships in the packages reachable here, so this script builds one from SmolLM2-135M
(MoEfication). In every decoder layer the MLP's 1536 channels are split: the ``--shared`` most
important ones (mean |activation| x norm of their down-projection column) become an always-on
shared expert, the rest ``--experts`` routed experts of co-activating channels (balanced k-means on
the channels' activation patterns over calibration tokens), and a router is fit by least squares
to predict the norm of each routed expert's contribution from the MLP input. The result is a stock
transformers ``Qwen2MoeForCausalLM`` with SmolLM2's attention, norms and embeddings, which computes
SmolLM2's MLP restricted to the shared channels and those of the top-``--top-k`` experts: the
router's logits are scaled to at most 1e-3 so that the renormalised top-k weights are ~1/k (each
expert's down projection is multiplied by k), the shared expert's gate is 0 (sigmoid 1/2, its down
projection doubled). With every expert selected it reproduces SmolLM2 (checked: same perplexity).
It is cached and built from calibration windows of seed 1; the pruning calibration uses seeds 0-2.

Then, each configuration in its own process: perplexity of the dense MoE and after pruning 50% of
the MoE's weights (routed experts and shared expert; attention and routers left dense) with
magnitude, Wanda, SparseGPT and ALPS, each routed expert solved on the tokens routed to it (and
SparseGPT with ``expert_calibration="all"``), on two held-out texts: the evaluation split of the
packaged Wikipedia leads and the Python reference (stdlib ``pydoc_data.topics``).

    python benchmarks/moe.py                                   # -> docs/results/moe.md
    python benchmarks/moe.py --runs sparsegpt wanda --seeds 0   # a subset
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from harness import in_process, parser as harness_parser, peak_rss_mb, write_report
from texts import TEXTS, evaluation_text


#: whole-expert removal: "drop-<score>-<percent of the routed experts removed>"
DROPS = [f"drop-{score}-{level}" for level in (25, 50) for score in ("reap", "frequency", "random")]
#: narrower experts: "narrow-<method>-<percent of every routed expert's channels removed>"
NARROWS = [f"narrow-fasp-{level}" for level in (25, 50)]
RUNS = ["magnitude", "wanda", "sparsegpt", "sparsegpt[all]", "alps", "smollm2:sparsegpt", *DROPS, *NARROWS]
# runs compared over several calibration seeds (the routed / all difference is small; the expert
# scores are compared with each other); the others differ by far more than the seed-to-seed spread
# and run with the first seed only. A random removal uses the calibration seed as its own seed.
SEEDED = ["sparsegpt", "sparsegpt[all]", *DROPS]
TEMPERATURE = 1e-3


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
def build_moe(checkpoint: str, folder: str, experts: int, top_k: int, shared: int, samples: int, seqlen: int,
              tokens: int) -> dict:
    """MoEfy SmolLM2 into ``folder`` (a Qwen2-MoE checkpoint); returns what was built."""
    import transformers

    from optimum_prune.calibration.data import calibration_windows

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    cfg = model.config
    windows = calibration_windows("packaged:wiki-leads", tokenizer, samples, seqlen, seed=1)
    generator = torch.Generator().manual_seed(0)
    keep = torch.randperm(samples * seqlen, generator=generator)[:tokens]  # the same tokens in every layer
    inputs = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for i, layer in enumerate(model.model.layers)]
    for batch in windows.split(8):
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    routed = cfg.intermediate_size - shared
    width = routed // experts
    moe_config = transformers.Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings, qkv_bias=False, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, moe_intermediate_size=width,
        shared_expert_intermediate_size=shared, decoder_sparse_step=1, mlp_only_layers=[],
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    router_fit = []
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(inputs.pop(i))[keep]
        mlp = layer.mlp
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # tokens x 1536
        importance = act.abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
        order = importance.argsort(descending=True)
        shared_channels, rest = order[:shared].sort().values, order[shared:]
        features = act[:, rest].abs().T
        features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        groups = _balanced_kmeans(features, experts, seed=i)
        channels = [rest[groups == e].sort().values for e in range(experts)]
        # what each expert adds to the MLP output, per token: the router learns to predict its norm
        scores = torch.stack([(act[:, ch] @ mlp.down_proj.weight[:, ch].T).norm(dim=1) for ch in channels], dim=1)
        xb = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        ridge = 1e-3 * xb.square().mean() * torch.eye(xb.shape[1])
        weight = torch.linalg.solve(xb.T @ xb + ridge, xb.T @ scores).T[:, :-1]  # experts x hidden (bias dropped)
        logits = x @ weight.T
        chosen, best = logits.topk(top_k, dim=1).indices, scores.topk(top_k, dim=1).indices
        router_fit.append(float((chosen.unsqueeze(2) == best.unsqueeze(1)).any(2).float().mean()))
        prefix = f"model.layers.{i}.mlp"
        # logits of at most TEMPERATURE: the softmax is ~uniform, the renormalised top-k weights ~1/k
        state[f"{prefix}.gate.weight"] = weight * (TEMPERATURE / float(logits.abs().max()))
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mlp.gate_proj.weight[ch], mlp.up_proj.weight[ch]]) for ch in channels])
        state[f"{prefix}.experts.down_proj"] = torch.stack([top_k * mlp.down_proj.weight[:, ch] for ch in channels])
        state[f"{prefix}.shared_expert.gate_proj.weight"] = mlp.gate_proj.weight[shared_channels]
        state[f"{prefix}.shared_expert.up_proj.weight"] = mlp.up_proj.weight[shared_channels]
        state[f"{prefix}.shared_expert.down_proj.weight"] = 2 * mlp.down_proj.weight[:, shared_channels]
        state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)  # sigmoid(0) = 1/2
    moe = transformers.AutoModelForCausalLM.from_config(moe_config).eval()
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    moe.tie_weights()
    os.makedirs(folder, exist_ok=True)
    moe.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"experts": experts, "top_k": top_k, "expert_width": width, "shared_width": shared,
            "build_windows": samples, "build_seqlen": seqlen, "tokens_per_layer": tokens,
            "router_top_k_overlap": sum(router_fit) / len(router_fit), "temperature": TEMPERATURE}
    with open(os.path.join(folder, "moefication.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    return info


def _evaluate(model, tokenizer, args) -> dict:
    from optimum_prune.evaluation import perplexity

    return {name: perplexity(model, tokenizer, evaluation_text(name), seqlen=args.seqlen, max_windows=args.eval_windows)
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

    source, _, spec = run.rpartition(":")  # "smollm2:sparsegpt": the dense source model, same MLP-only prune
    folder = args.checkpoint if source == "smollm2" else args.moe
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    method, _, mode = spec.partition("[")
    if method.startswith("drop-"):  # whole experts of every MoE block (router rows with them)
        _, score, level = method.split("-")
        config = PruningConfig(method="expert-drop", pattern="structured", sparsity=int(level) / 100,
                               num_calibration_samples=args.num_samples, seqlen=args.seqlen, seed=seed,
                               method_kwargs={"score": score, "seed": seed})
    elif method.startswith("narrow-"):  # every routed expert loses the same share of its own channels
        _, name, level = method.split("-")
        config = PruningConfig(method=name, pattern="structured", sparsity=int(level) / 100,
                               num_calibration_samples=args.num_samples, seqlen=args.seqlen, seed=seed)
    else:
        config = PruningConfig(method=method, sparsity=0.5, num_calibration_samples=args.num_samples,
                               seqlen=args.seqlen, seed=seed, ignore=["*self_attn*"],
                               expert_calibration=mode.rstrip("]") or "routed",
                               method_kwargs={"max_iter": 100} if method == "alps" else {})
    windows = calibration_windows("packaged:wiki-leads", tokenizer, args.num_samples, args.seqlen, seed)
    pruner = Pruner(config)
    start = time.perf_counter()
    pruner.prune(model, windows, progress=False)
    seconds = time.perf_counter() - start
    mlp = [p for n, p in model.named_parameters()  # the MLP's matrices, routers left out
           if ".mlp." in n and p.dim() >= 2 and not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    zeros = sum(int((p == 0).sum()) for p in mlp) / sum(p.numel() for p in mlp)
    report = pruner.report
    queue.put({"run": run, "seed": seed, "ppl": _evaluate(model, tokenizer, args), "prune_s": seconds,
               "mlp_sparsity": zeros, "expert_matrices": report.expert_matrices,
               "fallbacks": sum(report.expert_fallbacks.values()), "peak_rss_mb": peak_rss_mb(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "removed_experts": report.removed_experts})


def _mean_spread(values) -> str:
    """``mean ± half the range`` over seeds, or the one value."""
    mean = sum(values) / len(values)
    return f"{mean:.2f}" + (f" ± {(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else "")


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
        f"(MoEfication, see the script's docstring): every layer's 1536 MLP channels split into a shared expert of "
        f"{info['shared_width']} channels and {info['experts']} routed experts of {info['expert_width']} "
        f"co-activating channels, a least-squares router, top-{info['top_k']} routing — a stock "
        f"`Qwen2MoeForCausalLM` with real weights. The router picks, on average over the layers, "
        f"{info['router_top_k_overlap']:.0%} of the top-{info['top_k']} experts by actual contribution (on its "
        f"build tokens). Built from {info['build_windows']} x {info['build_seqlen']} calibration tokens of seed 1. "
        "With all experts selected it computes SmolLM2 exactly; top-4 of 8 loses the rest of the MLP, hence its "
        "higher perplexity: the pruning results below are relative to the dense MoE.",
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
        f"**Unstructured 50% of the MoE weights** (routed experts and the shared expert; attention and routers left "
        f"dense), "
        f"{args.num_samples} calibration windows x {args.seqlen} tokens of the Wikipedia calibration split; "
        f"calibration seed 0, and for {' and '.join(SEEDED)} seeds {', '.join(map(str, args.seeds))} (mean ± half the "
        f"range). `smollm2: sparsegpt` is the same MLP-only prune of the dense source model, for scale. Each expert is "
        f"solved as its own problem on the tokens routed to it; `[all]` = `expert_calibration=\"all\"` (every token). "
        "ALPS runs with `max_iter=100` (default 300) to fit the time.",
        "",
        "| model: method | wiki | x its dense | python | x its dense | MLP sparsity | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, items in by_run.items():
        if run.startswith(("drop-", "narrow-")):
            continue
        base = dense["smollm2"] if run.startswith("smollm2:") else dense["moe"]
        label = run if run.startswith("smollm2:") else f"MoE: {run}"
        seeds = f" ({len(items)} seeds)" if len(items) > 1 else " (seed 0)"
        wiki = [r["ppl"]["wiki"] for r in items]
        python = [r["ppl"]["python"] for r in items]
        seconds = sum(r["prune_s"] for r in items) / len(items)
        rss = max(r["peak_rss_mb"] for r in items)
        lines.append(
            f"| {label}{seeds} | {_mean_spread(wiki)} | {sum(wiki) / len(wiki) / base['wiki']:.2f} | "
            f"{_mean_spread(python)} | {sum(python) / len(python) / base['python']:.2f} | "
            f"{items[0]['mlp_sparsity']:.4f} | {seconds:.0f} | {rss:.0f} |")
    lines += _drop_table(by_run, dense, args, info)
    # raw rows without the per-block lists of removed experts (kept in the cache next to the model)
    lines += ["", "Raw rows:", "", "```json", *(json.dumps({k: v for k, v in r.items() if k != "removed_experts"})
                                                 for r in rows), "```", ""]
    write_report(path, "\n".join(lines), echo=False)


def _stored_parameters(folder: str) -> int:
    """Parameters in a checkpoint's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as handle:
                for key in handle.keys():
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= size
                    total += count
    return total


def _drop_table(by_run, dense, args, info) -> list[str]:
    """Whole-expert removal: one row per score and level, mean ± half the range over the seeds."""
    drops = [run for run in [*DROPS, *NARROWS] if run in by_run]
    if not drops:
        return []
    lines = [
        "",
        f"**Whole experts removed** (`expert-drop`, structured): 25% and 50% of the {info['experts']} routed experts "
        f"of every layer ({info['experts'] // 4} and {info['experts'] // 2}) with their router rows; top-{info['top_k']} "
        "routing among the experts left (at 50% every token uses all four). Scores from the calibration tokens routed "
        "to each expert: `reap` = mean over them of routing weight x ||expert output|| (REAP), `frequency` = how many, "
        f"`random` = a seeded random choice (the calibration seed). Calibration seeds "
        f"{', '.join(map(str, args.seeds))}, {args.num_samples} windows x {args.seqlen} tokens; mean ± half the range. "
        "`narrower: fasp` rows keep every expert and remove the same share of each routed expert's intermediate "
        "channels instead (FASP scores, each expert's down projection restored on its own tokens; seed 0).",
        "",
        f"Dense MoE: {_stored_parameters(args.moe) / 1e6:.1f} M parameters (embeddings tied).",
        "",
        "| experts removed | score | wiki | x dense MoE | python | x dense MoE | parameters | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in drops:
        items = by_run[run]
        _, score, level = run.split("-")
        if run.startswith("narrow-"):
            level, score = f"{level}% of each expert's channels", f"narrower: {score}"
        else:
            level = f"{level}%"
        wiki = [r["ppl"]["wiki"] for r in items]
        python = [r["ppl"]["python"] for r in items]
        seconds = sum(r["prune_s"] for r in items) / len(items)
        lines.append(
            f"| {level} | {score} ({len(items)} seed{'s' if len(items) > 1 else ''}) | {_mean_spread(wiki)} | "
            f"{sum(wiki) / len(wiki) / dense['moe']['wiki']:.2f} | {_mean_spread(python)} | "
            f"{sum(python) / len(python) / dense['moe']['python']:.2f} | {items[0]['parameters'] / 1e6:.1f} M | "
            f"{seconds:.0f} |")
    return lines


def main():
    parser = harness_parser(__doc__, output="moe.md", seqlen=256, samples=32, eval_windows=32)
    parser.add_argument("--runs", nargs="+", default=RUNS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared", type=int, default=512, help="MLP channels of the shared expert (always on)")
    parser.add_argument("--build-tokens", type=int, default=4096, help="tokens per layer for clustering and router fit")
    parser.add_argument("--cache", default=None, help="where the MoE is kept (default: the package cache folder)")
    args = parser.parse_args()
    from optimum_prune.assets import cache_dir, smollm2_checkpoint

    args.checkpoint = smollm2_checkpoint()
    args.moe = args.cache or os.path.join(cache_dir(), f"smollm2-moe-s{args.shared}-{args.experts}x-top{args.top_k}")
    if not os.path.isfile(os.path.join(args.moe, "moefication.json")):
        print(f"building the MoE in {args.moe}", flush=True)
        build_moe(args.checkpoint, args.moe, args.experts, args.top_k, args.shared, 64, args.seqlen, args.build_tokens)
    with open(os.path.join(args.moe, "moefication.json")) as handle:
        info = json.load(handle)
    print(json.dumps(info), flush=True)
    dense_path = os.path.join(args.moe, f"dense-eval{args.eval_windows}x{args.seqlen}.json")
    if not os.path.isfile(dense_path):
        with open(dense_path, "w") as handle:
            json.dump(in_process(_dense, args), handle)
    dense = json.load(open(dense_path))
    print(json.dumps(dense), flush=True)
    # finished rows are kept next to the model: a rerun with the same settings only adds what is missing
    done_path = os.path.join(args.moe, f"rows-{args.num_samples}x{args.seqlen}-eval{args.eval_windows}.json")
    done = json.load(open(done_path)) if os.path.isfile(done_path) else []
    for seed in args.seeds:
        for run in args.runs:
            if (seed != args.seeds[0] and run not in SEEDED) or any(r["run"] == run and r["seed"] == seed for r in done):
                continue
            done.append(in_process(_prune, args, run, seed))
            print(json.dumps(done[-1]), flush=True)
            with open(done_path, "w") as handle:
                json.dump(done, handle, indent=1)
            write_results(args.output, args, info, dense, done)
    write_results(args.output, args, info, dense, done)


if __name__ == "__main__":
    main()
