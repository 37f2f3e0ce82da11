"""Several processes (``torchrun`` / ``accelerate launch``): shard the calibration windows, reduce
the statistics, keep every rank's weights identical.

When a ``torch.distributed`` process group is initialised with more than one rank, the engine

1. gives each rank every ``world_size``-th calibration window (`shard_windows`), so the forward
   passes, which dominate a prune, are split between the ranks;
2. all-reduces (sums) each layer's statistics — token counts, sums of squares, Gram matrices and
   the cross terms of error correction (`reduce_statistics`) — so that every rank solves the same
   problem as one process on all the windows;
3. broadcasts rank 0's pruned layer to the other ranks (`broadcast_layer`), so that the weights
   are identical on all ranks even where solvers are not bit-deterministic (GPUs) — and the next
   layer's inputs on every rank come from the same pruned layer.

Works with NCCL (statistics live on the GPU a layer is solved on) and gloo (CPU). Only rank 0
writes the output folder (`Pruner.save_pretrained`, the CLI).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PruningError


def init_from_env(device: str | None = None) -> bool:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment
    (``WORLD_SIZE`` > 1): NCCL when the compute device is a GPU, gloo otherwise; each process uses
    the GPU of its ``LOCAL_RANK``. Returns whether several processes take part."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return is_distributed()


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def _device_for_collectives(device: torch.device) -> torch.device:
    """Where a tensor living on ``device`` must be for a collective: NCCL needs CUDA, gloo takes CPU."""
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard_windows(windows: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's calibration windows: every ``world_size``-th one, starting at ``rank``."""
    if windows is None or not is_distributed():
        return windows
    if windows.shape[0] < world_size():
        raise PruningError(
            f"{windows.shape[0]} calibration windows cannot be shared by {world_size()} processes; use at least "
            f"as many windows (num_calibration_samples) as processes."
        )
    return windows[rank():: world_size()]


@torch.no_grad()
def reduce_statistics(stats) -> None:
    """Sum `InputStatistics` (an iterable of them) over all ranks, in place."""
    if not is_distributed():
        return
    for stat in stats:
        home = torch.device("cpu")
        for name in ("sq_sum", "gram_sum", "cross_sum"):
            tensor = getattr(stat, name)
            if tensor is not None:
                home = tensor.device
                reduced = tensor.to(_device_for_collectives(home))
                torch.distributed.all_reduce(reduced)
                setattr(stat, name, reduced.to(home))
        count = torch.tensor([stat.count], dtype=torch.float64, device=_device_for_collectives(home))
        torch.distributed.all_reduce(count)
        stat.count = int(count.item())


@torch.no_grad()
def reduce_sums(tensors) -> None:
    """Sum tensors (counts, scores) over all ranks, in place."""
    if not is_distributed():
        return
    for tensor in tensors:
        reduced = tensor.to(_device_for_collectives(tensor.device))
        torch.distributed.all_reduce(reduced)
        tensor.copy_(reduced.to(tensor.device))


@torch.no_grad()
def broadcast_layer(layer: nn.Module) -> None:
    """Overwrite every rank's parameters of ``layer`` with rank 0's (shapes agree: budgets are
    deterministic). Parameters held by an accelerate offload store (meta tensors) are skipped."""
    if not is_distributed():
        return
    for param in layer.parameters():
        if param.device.type == "meta":
            continue
        value = param.data.to(_device_for_collectives(param.device))
        torch.distributed.broadcast(value, src=0)
        if value.data_ptr() != param.data.data_ptr():
            param.data.copy_(value)
