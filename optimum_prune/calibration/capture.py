"""Capturing what a decoder layer's Linears and experts receive: forward hooks that accumulate
input statistics (Linears fed the same tensor share one accumulator), per-expert statistics of
fused expert banks (`ExpertCollector`), the input of one Linear for one batch, and the exception
that cuts a forward short once every hooked input is seen.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tqdm.auto import tqdm

from ..errors import PruningError
from ..methods.structured import ExpertUsage
from ..structure.experts import ExpertBank
from ..structure.moe import MoEBlock
from ..runtime.offload import input_device, to_device
from .statistics import InputStatistics


class StopForward(Exception):
    """Raised by a hook to end a forward once what it needed is captured."""


class StatisticsCollector:
    """Forward hooks on target Linears that accumulate their input statistics.

    With ``share_inputs`` (a decoder layer's statistics pass), Linears fed the same tensor share one
    accumulator, found on the first batch by the identity of the tensor (the tensors of a batch are
    held until `next_batch` so that their memory is not reused); call `next_batch` after each batch.
    Without it (a whole-model pass), every Linear has its own accumulator and nothing is held."""

    def __init__(self, linears: dict[str, nn.Linear], kinds: dict[str, frozenset], stop_when_done: bool = False,
                 share_inputs: bool = True):
        self.kinds = kinds  # statistics to collect, per Linear name
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.stats: list[InputStatistics] = []
        self._seen: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._updated: set[int] = set()
        self._called: set[str] = set()
        self._total = len(linears)
        self._stop_when_done = stop_when_done
        self._share_inputs = share_inputs
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if name in self.group_of:
                index = self.group_of[name]
            else:  # first batch: group by the identity of the input tensor
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride())) if self._share_inputs else name
                if key in self._seen:
                    index = self._seen[key][0]
                else:
                    index = len(self.groups)
                    self.groups.append([])
                    self.stats.append(InputStatistics(x.shape[-1], self.kinds[name], device=x.device))
                    if self._share_inputs:
                        self._seen[key] = (index, x)  # holding x keeps its memory from being reused
                self.group_of[name] = index
                self.groups[index].append(name)
            if index not in self._updated:
                if self._share_inputs:
                    self._updated.add(index)
                self.stats[index].update(x)
            self._called.add(name)
            if self._stop_when_done and len(self._called) == self._total:
                # every target has its input: the rest of the layer (this Linear included) is not needed
                raise StopForward

        return hook

    def next_batch(self):
        self._seen.clear()
        self._updated.clear()
        self._called.clear()

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def bind_routing_call(signature: inspect.Signature, args, kwargs):
    """A call of a fused experts module bound to its ``forward``'s parameters, and the names of
    its first three (hidden states, expert indices, routing weights); None when the call is not
    one with expert indices."""
    names = list(signature.parameters)[:3]
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    if len(names) < 3 or bound.arguments.get(names[1]) is None:
        return None
    return bound, names


class ExpertCollector:
    """Per-expert input statistics of fused expert banks (`ExpertBank`), for the tokens routed to
    each expert — or, with ``all_tokens``, for every token (the routing is widened so that every
    expert runs on every token with a routing weight of 0 where the router did not choose it: the
    layer's output is unchanged).

    While an experts module runs (eager implementation, forced for the call), a torch-function mode
    sees ``bank[e]`` and the ``linear`` / ``@`` that multiplies by that slice, and adds its input to
    expert ``e``'s statistics: ``stats[bank name][e]``. ``routed[bank name][e]`` counts the tokens
    the router sent to ``e`` (every token with ``all_tokens``); `check` compares them.

    ``experts`` (a chunk, e.g. ``range(8, 16)``): only those experts' statistics are kept (the others'
    entries are None), so that a MoE layer with many experts is calibrated in several passes whose
    statistics each fit in memory; the other experts' inputs do not depend on them."""

    def __init__(self, banks: list[ExpertBank], kinds: frozenset, device, all_tokens: bool = False,
                 experts: range | None = None):
        self.banks = banks
        self.all_tokens = all_tokens
        self.experts = experts
        # every expert of the chunk has its accumulator from the start (several processes reduce the same list)
        self.stats: dict[str, list[InputStatistics | None]] = {
            b.name: [InputStatistics(b.in_features, kinds, device=device) if experts is None or e in experts else None
                     for e in range(b.num_experts)] for b in banks
        }
        self.routed: dict[str, torch.Tensor] = {b.name: torch.zeros(b.num_experts, dtype=torch.long) for b in banks}
        self._handles = []
        self._active: list = []
        modules = {id(b.module): b.module for b in banks}
        for module in modules.values():
            own = [b for b in banks if b.module is module]
            self._handles.append(module.register_forward_pre_hook(self._enter(module, own), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, banks: list[ExpertBank]):
        signature = inspect.signature(module.forward)

        def pre_hook(mod, args, kwargs):
            found = bind_routing_call(signature, args, kwargs)
            if found is None:
                return None  # not the (hidden states, indices, weights) call this collector knows
            bound, names = found
            index = bound.arguments[names[1]]
            if self.all_tokens:
                index, weights = widen_routing(index, bound.arguments.get(names[2]), banks[0].num_experts)
                bound.arguments[names[1]], bound.arguments[names[2]] = index, weights
            valid = index[index < banks[0].num_experts].flatten().cpu()
            counts = torch.bincount(valid, minlength=banks[0].num_experts)
            for bank in banks:
                self.routed[bank.name] += counts
            config = getattr(mod, "config", None)
            saved = getattr(config, "_experts_implementation", None)
            if config is not None and saved not in (None, "eager"):
                config._experts_implementation = "eager"  # the per-expert loop the mode can see
            mode = _ExpertMode(self, banks)
            mode.__enter__()
            self._active.append((mode, config, saved))
            return bound.args, bound.kwargs

        return pre_hook

    def _leave(self, module, args, output):
        if self._active:
            mode, config, saved = self._active.pop()
            mode.__exit__(None, None, None)
            if config is not None and saved not in (None, "eager"):
                config._experts_implementation = saved
        return None

    def update(self, bank: ExpertBank, expert: int, x: torch.Tensor) -> None:
        found = self.stats[bank.name][expert]
        if found is not None:
            found.update(x)

    def next_batch(self):
        pass

    def check(self) -> None:
        """Refuse when an expert received routed tokens its statistics did not see (an experts
        module whose forward does not multiply by one expert's slice at a time)."""
        for bank in self.banks:
            chunk = [e for e, s in enumerate(self.stats[bank.name]) if s is not None]
            seen = [self.stats[bank.name][e].count for e in chunk]
            if seen != self.routed[bank.name][chunk].tolist():
                raise PruningError(
                    f"The experts of {bank.family} ({bank.name}) are not computed one expert slice at a time, so "
                    f"their inputs cannot be captured; leave them out with ignore=['{bank.name.rsplit('.', 1)[0]}'] "
                    f"(--ignore) or prune them with magnitude, which needs no calibration."
                )

    def remove(self):
        for handle in self._handles:
            handle.remove()
        while self._active:
            self._leave(None, None, None)


class ExpertUsageCollector:
    """What each routed expert of MoE blocks (`MoEBlock`) contributes on the calibration tokens:
    how many tokens the router sent to it and the sum over them of ``routing weight * ||expert
    output||`` (REAP's saliency before the mean), in float64: ``usage[block name]`` (`ExpertUsage`).

    A hook on each experts module sees its call ``(hidden states, indices, weights)`` and runs the
    module once more on every (token, chosen expert) pair with weight 1, which gives each expert's
    own output for its tokens whatever the family's expert function is."""

    def __init__(self, blocks: list[MoEBlock]):
        self.blocks = blocks
        self.tokens = {b.name: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        self.weighted_norm = {b.name: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        self._inside = False
        self._handles = [b.experts.register_forward_hook(self._hook(b), with_kwargs=True) for b in blocks]

    def _hook(self, block: MoEBlock):
        signature = inspect.signature(block.experts.forward)

        def hook(module, args, kwargs, output):
            if self._inside:
                return None
            found = bind_routing_call(signature, args, kwargs)
            if found is None or found[0].arguments.get(found[1][2]) is None:
                raise PruningError(f"The experts of {block.family} ({block.experts_name}) are not called with "
                                   f"(hidden states, expert indices, routing weights); expert-drop cannot score them.")
            bound, names = found
            hidden, index, weights = (bound.arguments[name] for name in names)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index, weights = index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)
            routed = index < block.num_experts  # slots the router left empty carry index >= E
            tokens = torch.arange(hidden.shape[0], device=index.device)[:, None].expand_as(index)[routed]
            chosen = index[routed]
            self._inside = True
            try:  # every (token, expert) pair once, routing weight 1: the expert's own output
                out = module(hidden[tokens], chosen[:, None], torch.ones(chosen.shape[0], 1, dtype=weights.dtype,
                                                                           device=weights.device))
            finally:
                self._inside = False
            score = out.to(torch.float64).norm(dim=-1) * weights[routed].to(torch.float64)
            self.tokens[block.name] += torch.bincount(chosen.cpu(), minlength=block.num_experts).to(torch.float64)
            self.weighted_norm[block.name] += torch.bincount(chosen.cpu(), weights=score.cpu(),
                                                             minlength=block.num_experts)
            return None

        return hook

    def usage(self, block: MoEBlock) -> ExpertUsage:
        return ExpertUsage(self.tokens[block.name], self.weighted_norm[block.name], block.groups)

    def next_batch(self):
        pass

    def remove(self):
        for handle in self._handles:
            handle.remove()


class _ExpertMode(TorchFunctionMode):
    """Sees ``bank[e]`` and the products with that slice while an experts module runs."""

    _PRODUCTS = frozenset({F.linear, torch._C._nn.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                           torch.mm, torch.Tensor.mm})

    def __init__(self, collector: ExpertCollector, banks: list[ExpertBank]):
        super().__init__()
        self.collector, self.banks = collector, banks
        self.slices: dict[int, tuple[torch.Tensor, ExpertBank, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            bank = next((b for b in self.banks if args[0] is b.tensor), None)
            index = args[1]
            if bank is not None and (isinstance(index, int) or (torch.is_tensor(index) and index.dim() == 0
                                                                 and not index.is_floating_point())):
                self.slices[id(out)] = (out, bank, int(index))
        elif func in self._PRODUCTS and len(args) >= 2:
            found = self.slices.get(id(args[1]))
            if found is not None and found[0] is args[1]:
                self.collector.update(found[1], found[2], args[0].reshape(-1, args[0].shape[-1]))
        return out


def widen_routing(index: torch.Tensor, weights: torch.Tensor | None, num_experts: int):
    """Routing of every token to every expert: indices ``0..E-1`` per token, the router's weights
    where it chose the expert and 0 elsewhere."""
    flat = index.reshape(-1, index.shape[-1])
    wide_index = torch.arange(num_experts, device=index.device).expand(flat.shape[0], num_experts).contiguous()
    if weights is None:
        return wide_index, None
    flat_weights = weights.reshape(-1, weights.shape[-1])
    wide = torch.zeros(flat.shape[0], num_experts + 1, dtype=flat_weights.dtype, device=flat_weights.device)
    wide.scatter_(1, flat.clamp(max=num_experts), flat_weights)  # index E (masked slots) lands in a spare column
    return wide_index, wide[:, :num_experts].contiguous()


def check_called(linears: dict, collector: StatisticsCollector) -> None:
    missing = set(linears) - set(collector.group_of)
    if missing:
        raise PruningError(
            f"{', '.join(sorted(missing))} received no input during calibration (unused by the layer's "
            f"forward); add them to ignore."
        )


def input_of(linear: nn.Linear, layer: nn.Module, hidden, kw, device) -> torch.Tensor:
    """The input ``linear`` receives when ``layer`` runs on one batch (the forward stops there)."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise StopForward

    handle = linear.register_forward_pre_hook(hook)
    try:
        layer(to_device(hidden, device), **to_device(kw, device))
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise PruningError(f"{linear.__class__.__name__} received no input during calibration; add it to ignore.")
    return captured[0]


def first_output(output):
    """The hidden states of a decoder layer's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool = False,
                desc: str = "statistics") -> None:
    """Run calibration ``windows`` (n x seqlen token ids) through ``model`` in eval mode,
    ``batch_size`` windows per forward, for the hooks to see (a forward a hook ends with
    `StopForward` counts as done); the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        device = input_device(model)
        for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        model.train(was_training)
