"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: prune a tiny model in
several gloo processes and save each rank's weights (rank 0 also saves the model folder)."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from optimum_prune import Pruner, PruningConfig  # noqa: E402


def calibration_ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def model_for(method: str):
    """``*-moe``: a tiny Mixtral (fused expert banks); otherwise a tiny LLaMA."""
    if method.endswith("-moe"):
        from families import build

        return build("mixtral")
    return tiny_model("llama", num_hidden_layers=3)


def config(method: str) -> PruningConfig:
    method = method.removesuffix("-moe")
    pattern = "structured" if method in ("fasp", "spap", "expert-drop") else "unstructured"
    return PruningConfig(method=method, pattern=pattern, sparsity=0.4, num_calibration_samples=8, seqlen=32,
                         batch_size=2, channel_multiple=1)


def main(out: str, method: str) -> None:
    dist.init_process_group("gloo")
    model = model_for(method)
    pruner = Pruner(config(method))
    pruner.prune(model, calibration_ids(), progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(state, os.path.join(out, f"{method}-rank{dist.get_rank()}.safetensors"))
    pruner.save_pretrained(os.path.join(out, f"{method}-model"))  # only rank 0 writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
