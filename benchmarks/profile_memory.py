"""Peak-memory growth (VmHWM, reset around each call) of a SmolLM2-135M forward of one batch of 8 x 512
tokens stopped after the last decoder layer, and of `profiles.dense_input_norms` on it, twice in one process
(docs/results/scaling.md: the profiles' dense passes).

    python benchmarks/profile_memory.py 8
"""
import torch, torch.nn as nn, sys
from transformers import AutoModelForCausalLM
from optimum_prune.assets import smollm2_checkpoint
from optimum_prune.calibration.capture import StopForward
from optimum_prune.calibration.profiles import dense_input_norms
def hwm():
    for l in open('/proc/self/status'):
        if l.startswith('VmHWM'): return int(l.split()[1])//1024
def cur():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])//1024
def reset(): open('/proc/self/clear_refs','w').write('5')
model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()
bs = int(sys.argv[1]); x = torch.randint(0, 1000, (bs, 512))
layer_linears = [{f"{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)} for i, layer in enumerate(model.model.layers)]
def stop(m, a, o): raise StopForward
for trial in range(2):
    reset(); base = cur()
    h = model.model.layers[-1].register_forward_hook(stop)
    with torch.no_grad():
        try: model(input_ids=x, use_cache=False)
        except StopForward: pass
    h.remove(); print("stopped forward: +", hwm()-base, "MiB over", base, flush=True)
    reset(); base = cur()
    dense_input_norms(model, layer_linears, x, bs, model.model.layers[-1]); print("dense_input_norms: +", hwm()-base, "MiB over", base, flush=True)
