"""Peak-memory growth (VmHWM, reset around each call) of one batch of ``BATCH`` x 512 tokens
through SmolLM2-135M: `profiles.dense_input_norms` (the first pass of a prune with a profile),
then a plain forward stopped after the last decoder layer, three times in one process
(docs/results/scaling.md: the profiles' dense passes). ``keep``
runs the pass without returning free heap pages after each decoder layer (as before
`allocator.releasing_after`). At the end: what the C heap (``[heap]``) and the anonymous mappings
hold. ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment fixes glibc's mmap threshold instead.

    python benchmarks/profile_memory.py 8 [release|keep]
"""
import contextlib
import sys
import time

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from optimum_prune.assets import smollm2_checkpoint
from optimum_prune.calibration import profiles
from optimum_prune.calibration.capture import StopForward


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024


def reset():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS


def stop(module, args, output):
    raise StopForward


bs = int(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "release"
if mode == "keep":
    profiles.releasing_after = lambda layers: contextlib.nullcontext()
model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()
layers = list(model.model.layers)
with torch.no_grad():
    for p in model.parameters():  # page the weights in before measuring
        p.sum()
x = torch.randint(0, 1000, (bs, 512))
layer_linears = [{f"{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
                 for i, layer in enumerate(layers)]
for trial in range(3):
    reset(); base = status("VmRSS"); start = time.perf_counter()
    profiles.dense_input_norms(model, layer_linears, x, bs, layers)
    print(f"dense_input_norms ({mode}): +{status('VmHWM') - base} MiB over {base}, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    reset(); base = status("VmRSS")
    hook = layers[-1].register_forward_hook(stop)
    with torch.no_grad():
        try:
            model(input_ids=x, use_cache=False)
        except StopForward:
            pass
    hook.remove()
    print(f"stopped forward: +{status('VmHWM') - base} MiB over {base}", flush=True)
heap = anonymous = 0
name = None
for line in open("/proc/self/smaps"):
    fields = line.split()
    if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
        name = fields[5] if len(fields) > 5 else ""
    elif fields[:1] == ["Rss:"]:
        heap += int(fields[1]) if name == "[heap]" else 0
        anonymous += int(fields[1]) if name == "" else 0
print(f"resident now: [heap] {heap // 1024} MiB, anonymous mappings {anonymous // 1024} MiB")
