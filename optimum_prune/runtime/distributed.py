"""Several processes (``torchrun`` / ``accelerate launch``): shard the calibration windows, reduce
the statistics, keep every rank's weights identical.

When a ``torch.distributed`` process group is initialised with more than one rank, the engine

1. gives each rank every ``world_size``-th calibration window (`shard_windows`), so the forward
   passes, which dominate a prune, are split between the ranks;
2. all-reduces (sums) each layer's statistics — token counts, sums of squares, Gram matrices and
   the cross terms of error correction (`reduce_statistics`) — so that every rank solves the same
   problem as one process on all the windows;
3. shares the layer's solves: the engine cuts a layer's work into independent pieces (a Linear or
   a stack of Linears, one expert's matrix, a channel group, row blocks of one matrix where the
   method's rows separate), `assign` gives each piece to a rank by its estimated cost (longest
   first, to the least loaded rank), every rank solves its own pieces, and `exchange_results`
   hands every piece's result from its owner to all ranks, which apply it in one order — so the
   weights are identical on all ranks (each piece is solved once, by one rank) and the next layer's
   inputs on every rank come from the same pruned layer. A rank whose solve fails tells the others,
   and every rank stops with the same one line instead of waiting for it forever.

``OPTIMUM_PRUNE_SHARED_SOLVES=0`` turns the sharing off: every rank solves every piece and rank 0's
layer is broadcast (`broadcast_layer`): the reference the shared solves are checked against.

Works with NCCL (statistics live on the GPU a layer is solved on) and gloo (CPU). Only rank 0
writes the output folder (`Pruner.save_pretrained`, the CLI).
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import PruningError


def init_from_env(device: str | None = None) -> bool:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment
    (``WORLD_SIZE`` > 1): NCCL when the compute device is a GPU, gloo otherwise; each process uses
    the GPU of its ``LOCAL_RANK``. Returns whether several processes take part."""
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


def batch_share(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's part of a training batch every rank drew alike (every ``world_size``-th window,
    starting at ``rank``) and its share of the batch's windows; the whole batch and 1.0 in one
    process. Data-parallel recovery: each rank trains on its part, `average_gradients` combines."""
    if not is_distributed():
        return batch, 1.0
    if batch.shape[0] < world_size():
        raise PruningError(f"A recovery batch of {batch.shape[0]} windows cannot be shared by {world_size()} processes; "
                           f"use at least as many windows per step (--recover-batch-size) as processes.")
    local = batch[rank():: world_size()]
    return local, local.shape[0] / batch.shape[0]


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter], share: float, loss: torch.Tensor) -> float:
    """Data-parallel step: each rank's gradients (and ``loss``, a mean over its part of the batch)
    weighted by its ``share`` of the batch and summed over ranks in one flat all-reduce, so every
    rank holds the gradient of the whole batch's mean loss and steps its optimiser to the same
    weights. Returns the whole batch's loss. One process: nothing changes."""
    if not is_distributed():
        return float(loss.detach())
    grads = [p.grad for p in params if p.grad is not None]
    total = loss.detach().reshape(1).float() * share
    total = total.to(_device_for_collectives(total.device))
    torch.distributed.all_reduce(total)
    for bucket in _buckets(grads):
        flat = torch.cat([grad.reshape(-1) for grad in bucket]) * share
        reduced = flat.to(_device_for_collectives(flat.device))
        torch.distributed.all_reduce(reduced)
        offset = 0
        for grad in bucket:
            grad.copy_(reduced[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return float(total)


def _buckets(tensors: Sequence[torch.Tensor], elements: int = 1 << 25) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one device and dtype, about ``elements`` values per group (one
    all-reduce each, so the flat copy stays small beside the model)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size + tensor.numel() > elements or tensor.device != bucket[0].device
                       or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def synchronize() -> None:
    """Wait until every rank gets here (several processes; nothing otherwise)."""
    if is_distributed():
        torch.distributed.barrier()


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` any rank holds (several processes), else ``value``."""
    if not is_distributed():
        return value
    found = torch.tensor([value], dtype=torch.int64, device=_device_for_collectives(torch.device("cpu")))
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    return int(found.item())


def gather(value) -> list:
    """Every rank's ``value`` (a picklable object), in rank order."""
    if not is_distributed():
        return [value]
    found: list = [None] * world_size()
    torch.distributed.all_gather_object(found, value)
    return found


def solves_shared() -> bool:
    """Whether the processes share each layer's solves (several processes, not turned off by
    ``OPTIMUM_PRUNE_SHARED_SOLVES=0``)."""
    return is_distributed() and os.environ.get("OPTIMUM_PRUNE_SHARED_SOLVES", "1").strip() != "0"


def assign(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank that solves each piece: longest processing time first — pieces in decreasing cost
    (ties in index order) each go to the rank with the least cost so far (ties to the lower rank).
    Deterministic, so every rank computes the same assignment from the same costs."""
    loads, owners = [0.0] * ranks, [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        owner = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += float(costs[index])
    return owners


def _describe(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(key, tuple(value.shape), str(value.dtype).removeprefix("torch.")) for key, value in tensors.items()]


@torch.no_grad()
def exchange_results(own: dict[int, dict[str, torch.Tensor]], owners: Sequence[int], error: BaseException | None,
                     device: torch.device) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Every piece's result (name -> tensor), in piece order, on every rank: ``own`` holds the results
    of the pieces this rank solved (``owners[i] == rank()``), the others are broadcast by their
    owners and land on ``device``. ``error``: this rank's solve failed — every rank then raises
    (this one its own error, the others one line naming the failed rank) before any result moves."""
    gathered: list = [None] * world_size()
    mine = {index: _describe(result) for index, result in own.items()}
    message = None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    torch.distributed.all_gather_object(gathered, (message, mine))
    failed = [(r, found[0]) for r, found in enumerate(gathered) if found[0] is not None]
    if error is not None:
        raise error
    if failed:
        r, text = failed[0]
        raise PruningError(f"Process {r} failed while solving its share of the layer ({text}); every process stops.")
    for index, owner in enumerate(owners):
        result = {}
        for key, shape, dtype in gathered[owner][1][index]:
            if owner == rank():
                value = own[index][key]
            else:
                value = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            wire = value.to(_device_for_collectives(value.device))
            wire = wire.view(torch.uint8) if wire.dtype == torch.bool else wire  # bool is not every backend's
            torch.distributed.broadcast(wire, src=owner)
            received = wire.view(torch.bool) if value.dtype == torch.bool else wire
            result[key] = value if owner == rank() else received.to(device)
        own.pop(index, None)
        yield index, result
