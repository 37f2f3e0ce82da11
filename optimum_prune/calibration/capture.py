"""Capturing what a decoder layer's Linears receive: forward hooks that accumulate input
statistics (Linears fed the same tensor share one accumulator), the input of one Linear for one
batch, and the exception that cuts a forward short once every hooked input is seen.
"""

from __future__ import annotations

import torch
from torch import nn

from tqdm.auto import tqdm

from ..errors import PruningError
from .offload import input_device, to_device
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
