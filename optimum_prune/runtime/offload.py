"""Devices and accelerate offload: where a layer runs, and how its weights are read and written
when accelerate keeps them in an offload store (CPU dict or disk) instead of the module.

Everything the engines do to a weight goes through here, so that a pruned weight always lands
where the next forward reads it: the module, or the offload store (accelerate's ``weights_map``;
weights the store keeps on disk are written back to disk).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..errors import PruningError
from ..structure.shrink import replace_param


def check_device(device, flag: str = "device (--device)") -> torch.device | None:
    """``device`` as a `torch.device` this machine can compute on, or one `PruningError` line: an
    unknown name, the meta device, or a device torch cannot reach here (no CUDA build, index past
    the devices present). None stays None (each layer runs where it lives)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PruningError(f"{flag} {device!r} is not a device torch knows; give cpu, cuda, cuda:N, mps or xpu.") from None
    if parsed.type == "meta":
        raise PruningError(f"{flag} meta holds no data and cannot compute; give cpu or an accelerator (cuda:N).")
    if parsed.type == "cpu":
        return parsed
    module = getattr(torch, parsed.type, None)
    if parsed.type == "mps":  # torch.mps has no is_available
        available = torch.backends.mps.is_available()
    else:
        available = bool(module is not None and hasattr(module, "is_available") and module.is_available())
    if not available:
        raise PruningError(f"{flag} {device!r} is not available on this machine (this torch build or machine has no "
                           f"{parsed.type} device); use cpu or a device it has.")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise PruningError(f"{flag} {device!r} does not exist: this machine has {count} {parsed.type} device(s) "
                           f"({parsed.type}:0 to {parsed.type}:{count - 1}).")
    return parsed


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device without an accelerate offload hook that
    loads them (built under ``torch.device("meta")`` or ``init_empty_weights``): nothing to prune."""
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.device.type == "meta" and offload_hook(module) is None:
                raise PruningError(f"The model's weight {name + '.' if name else ''}{pname} is on the meta device (no "
                                   f"data: built empty, e.g. under init_empty_weights); load the weights "
                                   f"(from_pretrained) or dispatch them with accelerate before pruning.")


def to_device(obj, device):
    """``obj`` (a tensor, or tuples, lists and dicts of them) moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def offload_hook(module: nn.Module):
    """The accelerate hook that keeps ``module``'s weights in an offload store, or None."""
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and getattr(hook, "offload", False) else None


def execution_device(layer: nn.Module, fallback: torch.device) -> torch.device:
    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    for param in layer.parameters():
        if param.device.type != "meta":
            return param.device
    return fallback


@contextlib.contextmanager
def onloaded(layer: nn.Module, device: torch.device):
    """Weights of ``layer`` on ``device`` for the duration of the block.

    Modules offloaded by accelerate (CPU or disk) are left to their hooks, which load the weights
    from the offload store for every forward; everything else is moved and moved back.
    """
    moved = [
        module
        for module in layer.modules()
        if offload_hook(module) is None
        and any(p.device != device and p.device.type != "meta" for p in module.parameters(recurse=False))
    ]
    homes = [next(module.parameters(recurse=False)).device for module in moved]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(moved, homes):
            module.to(home)


def offload_store(module: nn.Module):
    """(CPU dict, key prefix, loader) of an accelerate-offloaded module's weights, or None. The
    loader (accelerate's ``OffloadedWeightsLoader``) reads the dict first, then its disk index."""
    hook = offload_hook(module)
    if hook is None:
        return None
    weights_map = hook.weights_map
    loader = getattr(weights_map, "dataset", weights_map)
    return getattr(loader, "state_dict", loader), getattr(weights_map, "prefix", ""), loader


def _store_put(linear: nn.Linear, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the offloaded parameter ``name`` of ``linear``. A parameter that the store
    keeps on disk is written back to disk (accelerate's ``offload_weight``: a ``.dat`` file in the
    offload folder, the index updated), so pruned weights do not pile up in CPU memory; the
    original checkpoint files are never modified."""
    state, prefix, loader = offload_store(linear)
    key = prefix + name
    folder, index = getattr(loader, "save_folder", None), getattr(loader, "index", None)
    if folder is not None and index is not None and key in index and key not in state:
        from accelerate.utils import offload_weight

        offload_weight(value.detach().to("cpu").contiguous(), key, folder, index=index)
    else:
        state[key] = value.detach().to("cpu")


#: torch dtype -> dtype name in a safetensors header (checkpoints write them, offload stores read them)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_OF_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def stored_dtype(linear: nn.Linear, name: str) -> torch.dtype:
    """Dtype of an offloaded parameter, from the store's index or file header when it can be had
    without reading the tensor (a disk-offloaded weight is read once, to be pruned, not twice)."""
    state, prefix, loader = offload_store(linear)
    key = prefix + name
    info = None if key in state else getattr(loader, "index", {}).get(key)
    if info is not None and isinstance(getattr(torch, str(info.get("dtype")), None), torch.dtype):
        return getattr(torch, info["dtype"])
    if info is not None and info.get("safetensors_file") and "dtype" not in info:
        from safetensors import safe_open

        with safe_open(info["safetensors_file"], framework="pt") as handle:
            dtype = _DTYPE_OF_SAFETENSORS.get(handle.get_slice(info.get("weight_name", key)).get_dtype())
        if dtype is not None:
            return dtype
    return offload_hook(linear).weights_map[name].dtype


def current_value(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Parameter ``name`` of ``module`` as its next forward reads it: from the offload store when
    accelerate keeps it there, else the module's own tensor (not copied)."""
    hook = offload_hook(module)
    return hook.weights_map[name] if hook is not None else getattr(module, name).detach()


def read_weight(linear: nn.Linear, device: torch.device, name: str = "weight") -> torch.Tensor:
    """Parameter ``name`` of ``linear`` as float32 on ``device`` (from the offload store if any). Not
    a copy when it is float32 on ``device`` already: callers must not edit it in place."""
    return current_value(linear, name).to(device=device, dtype=torch.float32)


def write_weight(linear: nn.Linear, new: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``new`` (zeroed where ``mask``) into ``linear`` in its dtype; returns what was written."""
    offloaded = offload_store(linear)
    dtype = linear.weight.dtype if offloaded is None else stored_dtype(linear, "weight")
    value = new.to(dtype=dtype)
    if mask is not None:
        value = value.masked_fill(mask, 0)
    commit_value(linear, "weight", value)
    return value


def editable_value(module: nn.Module, name: str) -> torch.Tensor:
    """A tensor in which to edit parameter ``name`` of ``module`` in place, in its stored dtype:
    the parameter's own data, or, when accelerate offloads the module, a CPU copy of what its store
    holds (then `commit_value` puts it back)."""
    if offload_hook(module) is None:
        return getattr(module, name).data
    return current_value(module, name).detach().to("cpu", copy=True)


def commit_value(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` (from `editable_value`, or a checkpoint's record) parameter ``name`` of
    ``module``: in the offload store when there is one, and in the module unless it is on meta."""
    if offload_store(module) is not None:
        _store_put(module, name, value)
    param = getattr(module, name)
    if param.device.type != "meta" and value.data_ptr() != param.data_ptr():  # not edited in place
        with torch.no_grad():
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def set_param(linear: nn.Linear, name: str, value: torch.Tensor) -> None:
    """`replace_param` that also updates an accelerate offload store (structured shrinking)."""
    offloaded = offload_store(linear)
    if offloaded is None:
        replace_param(linear, name, value)
        return
    old = getattr(linear, name)
    dtype = stored_dtype(linear, name)
    _store_put(linear, name, value.to(dtype=dtype))
    setattr(linear, name, nn.Parameter(torch.empty(value.shape, dtype=old.dtype, device=old.device), requires_grad=False))


def dense_snapshot(linear: nn.Linear) -> torch.Tensor:
    """The weight tensor a forward of ``linear`` uses now, kept aside before it is pruned. For an
    offloaded Linear the pruned weight replaces the store's tensor, so a reference suffices."""
    hook = offload_hook(linear)
    return hook.weights_map["weight"] if hook is not None else linear.weight.data.clone()


_ON_DISK = object()  # `_exchange_weight`: the store had the weight on disk, not in its CPU dict


def _exchange_weight(linear: nn.Linear, value):
    """Make ``value`` the weight tensor the next forward of ``linear`` uses (module or offload
    store: a pointer swap, no copy); returns what it replaces, to be exchanged back. In an offload
    store the swapped-in tensor goes to the CPU dict, which the store reads first."""
    offloaded = offload_store(linear)
    if offloaded is not None:
        store, prefix, _ = offloaded
        key = prefix + "weight"
        old = store.get(key, _ON_DISK)
        if value is _ON_DISK:
            store.pop(key, None)
        else:
            store[key] = value
    else:
        old, linear.weight.data = linear.weight.data, value
    return old


@contextlib.contextmanager
def swapped(weights: dict[nn.Linear, torch.Tensor]):
    """Run the block with the given weight tensors in the Linears."""
    saved = [(linear, _exchange_weight(linear, value)) for linear, value in weights.items()]
    try:
        yield
    finally:
        for linear, value in saved:
            _exchange_weight(linear, value)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the execution device of its input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    return torch.device("cpu")


def offloaded_copy(model: nn.Module, place: str = "device", dtype: torch.dtype | None = None,
                   folder: str | None = None) -> nn.Module:
    """A frozen copy of ``model`` (in ``dtype`` when given), for reading only (a distillation teacher).

    ``place``: ``"device"`` — an ordinary copy where the model is; ``"cpu"`` — the weights in host
    memory and ``"disk"`` — in memory-mapped files under ``folder`` (which must be empty or absent),
    each module's weights brought to the model's input device for its own forward by accelerate's
    offload hooks, so the device holds one module's weights at a time. The copy is built on the meta
    device and filled one tensor at a time (never a second whole model on the device); tied
    weights stay tied and are stored once. A model already dispatched by accelerate is copied as is
    only with ``"device"``."""
    import copy

    if place not in ("device", "cpu", "disk"):
        raise PruningError(f"Unknown place {place!r} for the model's copy; choose device, cpu or disk.")
    dispatched = any(getattr(module, "_hf_hook", None) is not None for module in model.modules())
    if place == "device" or dispatched:
        if place != "device":
            raise PruningError(f"The model is dispatched by accelerate (device_map / offload); its copy cannot be "
                               f"offloaded again to {place}: keep it where the model is ('device').")
        found = copy.deepcopy(model)
        if dtype is not None:
            found.to(dtype)
    else:
        params = list(model.parameters())
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype, device="meta"), requires_grad=False)
                for p in params}
        found = copy.deepcopy(model, memo)  # buffers copied; parameters left on meta, to be offloaded
        _attach_offloaded_weights(found, model, place, dtype, folder, input_device(model))
    for param in found.parameters():
        param.requires_grad_(False)
    return found.eval()


def _attach_offloaded_weights(found: nn.Module, model: nn.Module, place: str, dtype, folder, device) -> None:
    from accelerate import cpu_offload, disk_offload
    from accelerate.utils import offload_weight, save_offload_index

    copies: dict[tuple, torch.Tensor] = {}  # tied tensors copied once (the same storage, place and shape)

    def copied(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else None, copy=True)
        return copies[key]

    state = model.state_dict()
    if place == "cpu":
        cpu_offload(found, execution_device=device, state_dict={name: copied(value) for name, value in state.items()})
        return
    if os.path.isdir(folder) and os.listdir(folder):
        raise PruningError(f"{folder} is not empty; give an empty or new folder for the offloaded copy.")
    os.makedirs(folder, exist_ok=True)
    index: dict = {}
    for name, value in state.items():  # one tensor in host memory at a time
        offload_weight(value.detach().to("cpu", dtype=dtype if value.is_floating_point() else None), name, folder,
                       index=index)
    save_offload_index(index, folder)
    disk_offload(found, folder, execution_device=device)
