"""Runs inside the vLLM-CPU virtualenv that benchmarks/serve.py builds: imports vllm, not optimum-prune.

    python serve_vllm_worker.py FOLDER REQUEST.json RESULT.json

REQUEST: {"prompts": [[ids], ...], "new_tokens": 32, "speed_prompt": [ids], "speed_new": 128,
"repeats": 3}. RESULT: the greedy token ids per prompt (end-of-sequence ignored, fp32), and for each
repetition the seconds of a prefill-only request (one new token) and of the same prompt generating
``speed_new`` tokens; or {"error": "..."} when vLLM cannot load the folder.
"""

import json
import sys
import time


def main(folder, request_path, result_path):
    request = json.load(open(request_path))
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=folder, dtype="float32", trust_remote_code=True, max_model_len=1024, seed=0,
                  enable_prefix_caching=False)
    except Exception as err:  # noqa: BLE001 - reported in the results table
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        json.dump({"error": f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]}, open(result_path, "w"))
        return

    def run(prompts, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    greedy = [run([prompt], request["new_tokens"])[0] for prompt in request["prompts"]]
    run([request["speed_prompt"]], 2)  # warm-up
    timings = []
    for _ in range(request["repeats"]):
        start = time.perf_counter()
        run([request["speed_prompt"]], 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        run([request["speed_prompt"]], request["speed_new"] + 1)
        timings.append({"prefill_seconds": prefill, "total_seconds": time.perf_counter() - start})
    json.dump({"greedy": greedy, "timings": timings}, open(result_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    main(*sys.argv[1:4])
