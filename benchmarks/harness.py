"""The benchmarks' shared harness: arguments every benchmark spells the same way, one process
runner (each measurement in a fresh spawned process, optionally capped in time), a rows file that
a re-run resumes from, the report writer, and the measurements every benchmark makes of memory,
disk and the packaged model.

Scripts run as ``python benchmarks/<name>.py``; this folder is then first on ``sys.path``, so
``from harness import ...`` needs no path edits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from queue import Empty


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "docs", "results")


def parser(doc: str, *, output: str | None = None, seqlen: int | None = None, samples: int | None = None,
           eval_windows: int | None = None, seeds: bool = False, resume: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the shared arguments asked for: ``--output`` (default
    ``docs/results/<output>``), ``--seqlen``, ``--num-samples``, ``--eval-windows``, ``--seeds``,
    ``--resume FILE.jsonl``."""
    found = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if output is not None:
        found.add_argument("--output", default=os.path.join(RESULTS, output), help="the report (markdown)")
    if seqlen is not None:
        found.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})")
    if samples is not None:
        found.add_argument("--num-samples", type=int, default=samples,
                           help=f"calibration windows (default {samples})")
    if eval_windows is not None:
        found.add_argument("--eval-windows", type=int, default=eval_windows,
                           help=f"evaluation windows per text (default {eval_windows})")
    if seeds:
        found.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (default 0)")
    if resume:
        found.add_argument("--resume", default=None, metavar="FILE.jsonl",
                           help="finished rows: read, not re-run; new ones appended")
    return found


def add_speed_arguments(found: argparse.ArgumentParser, batch_size: int = 4, prompt_length: int = 512,
                        new_tokens: int = 32, repeats: int = 5) -> None:
    """The arguments of `speed_of`: ``--device``, ``--batch-size``, ``--prompt-length``, ``--new-tokens``,
    ``--repeats``."""
    found.add_argument("--device", default="cpu")
    found.add_argument("--batch-size", type=int, default=batch_size, help="prompts per prefill")
    found.add_argument("--prompt-length", type=int, default=prompt_length, help="tokens per prompt")
    found.add_argument("--new-tokens", type=int, default=new_tokens, help="greedy decode steps")
    found.add_argument("--repeats", type=int, default=repeats, help="timed runs (median)")


def speed_of(folder: str, args, queue) -> None:
    """The speed and size of the model saved in ``folder`` (`optimum_prune.evaluation.speed.measure_speed`,
    the arguments of `add_speed_arguments`), put on ``queue``; run it with `in_process` (a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_prune  # noqa: F401  (registers the pruned classes)
    from optimum_prune.evaluation.speed import measure_speed

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)
    report = measure_speed(model, batch_size=args.batch_size, prompt_length=args.prompt_length,
                           new_tokens=args.new_tokens, repeats=args.repeats)
    queue.put({**report.to_dict(), "disk_mb": disk_mb(folder)})


def speed_prompt(tokenizer, length: int) -> list[int]:
    """The first ``length`` token ids of held-out Wikipedia leads (evaluation split): the prompt every
    engine's throughput run prefills."""
    from optimum_prune.assets import wiki_leads

    return tokenizer("\n\n".join(wiki_leads("evaluation")[20:60])).input_ids[:length]


def llama_cpp_timing(engine, prompt: list[int], new_tokens: int) -> dict:
    """One timed run on an open `optimum_prune.evaluation.llamacpp.LlamaCpp` (after an 8-token
    warm-up; the prompt cache is off): ``prompt`` prefilled, ``new_tokens`` generated; llama.cpp's own
    prompt and generated tokens/s."""
    engine.generate(prompt, 8)
    engine.generate(prompt, new_tokens)
    return {"prompt_tps": engine.timings["prompt_per_second"], "generated_tps": engine.timings["predicted_per_second"]}


def llama_cpp_speed(folder: str, gguf: str, args, queue) -> None:
    """The model saved in ``folder`` exported to ``gguf`` (f32) and run in llama.cpp with as many
    threads as torch uses: median prompt and generated tokens/s over ``args.repeats`` runs of a
    ``args.prompt_length``-token prompt generating ``args.llama_new`` tokens, put on ``queue``; run it
    with `in_process`."""
    import statistics

    import torch
    from transformers import AutoTokenizer

    from optimum_prune.evaluation.llamacpp import LlamaCpp
    from optimum_prune.export.gguf import export_gguf

    export_gguf(folder, gguf, dtype="f32")
    prompt = speed_prompt(AutoTokenizer.from_pretrained(folder), args.prompt_length)
    with LlamaCpp(gguf, context=args.prompt_length + args.llama_new + 16, threads=torch.get_num_threads()) as engine:
        runs = [llama_cpp_timing(engine, prompt, args.llama_new) for _ in range(args.repeats)]
    queue.put({key: statistics.median(run[key] for run in runs) for key in ("prompt_tps", "generated_tps")}
              | {"runs": runs, "gguf_mb": os.path.getsize(gguf) / 2**20})


def in_process(target, *args, cap: float | None = None):
    """``target(*args, queue)`` in a fresh spawned process; returns what it put on the queue. A
    process that dies raises (without ``cap``) or gives ``{"error": ...}`` (with ``cap``: seconds
    after which it is stopped, also an error row)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    deadline = None if cap is None else time.monotonic() + cap
    while True:
        try:
            result = queue.get(timeout=5)
            proc.join()
            return result
        except Empty:
            if not proc.is_alive():
                if cap is None:
                    raise RuntimeError(f"{target.__name__}{args[1:]} died (exit code {proc.exitcode}); see its "
                                       f"traceback above") from None
                return {"error": f"died (exit code {proc.exitcode})"}
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                proc.join()
                return {"error": f"stopped after {cap:.0f} s"}


class Rows:
    """A JSON-lines file of finished rows, keyed by ``key(row)``: a re-run reads them instead of
    measuring again and appends the new ones (no file: nothing kept)."""

    def __init__(self, path: str | None, key):
        self.path, self.key = path, key
        self.done: dict = {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                self.done = {key(row): row for row in map(json.loads, filter(str.strip, handle))}

    def get(self, key):
        return self.done.get(key)

    def add(self, row: dict) -> dict:
        """Record a new row (printed, appended to the file) and return it."""
        print(json.dumps(row), flush=True)
        self.done[self.key(row)] = row
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        return row

    def measured(self, key, measure):
        """The row of ``key``: the finished one, or ``measure()``'s, recorded."""
        return self.done[key] if key in self.done else self.add(measure())

    def rewrite(self) -> None:
        """Write every row back (after they were edited in place)."""
        if self.path:
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in self.done.values())

def parse_options(text: str) -> dict:
    """'key=value,...' (values JSON; commas inside JSON lists do not separate options) -> dict."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    options = {}
    for item in filter(None, items + [current]):
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    return options


def parse_named(head: str) -> tuple[str, dict]:
    """'name' or 'name[key=value,...]' -> (name, options)."""
    name, _, options_text = head.partition("[")
    return name, parse_options(options_text[:-1] if options_text.endswith("]") else options_text)


def parse_run(spec: str):
    """'method:0.7', 'method:2:4' or 'method[key=value,...]:s0.2' -> (method, options, pattern, sparsity).
    Options are the method's, except ``targets`` / ``ignore`` (JSON lists), which go to `PruningConfig`."""
    head, _, rest = spec.partition(":")
    method, options = parse_named(head)
    if ":" in rest:
        return method, options, rest, None
    if rest.startswith("s"):
        return method, options, "structured", float(rest[1:])
    return method, options, "unstructured", float(rest)


def command_line(script: str, argv=None) -> str:
    """The command that made a report, as the report names it."""
    return f"python benchmarks/{script} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()


def write_report(path: str, text: str, echo: bool = True) -> None:
    """Write a report (printed too), whole or not at all."""
    if echo:
        print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_mb(folder: str) -> float:
    """The weight files (``*.safetensors``) of ``folder``, in MiB."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")) / 2**20


def load_fp32(checkpoint, device: str = "cpu"):
    """A checkpoint (the packaged SmolLM2 by default elsewhere) in float32, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)
