"""What every engine offers the pruner: one interface, so that the pruner never asks which engine
it holds (`engine.build.build_engine` picks the engine a method needs)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import PruningError
from .report import PruneReport


def require_windows(windows: torch.Tensor | None, method) -> None:
    """Refuse a run of a method that needs calibration data without any."""
    if windows is None or windows.numel() == 0:
        raise PruningError(f"Method {method.name!r} needs calibration data; none was given.")


@contextlib.contextmanager
def in_eval_mode(model: nn.Module):
    """The model in eval mode for the block, its train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Engine:
    """Runs one prune of a model with a method, as a config describes."""

    #: whether the engine runs under torchrun / accelerate launch (windows sharded over processes)
    supports_processes: bool = False

    def prepare(self, windows: torch.Tensor | None) -> None:
        """Work on the dense model before any weight changes (a sparsity profile)."""

    def check_memory(self, num_windows: int, seqlen: int, input_device: torch.device, checkpoint: bool) -> None:
        """Plan the prune's memory within what the devices offer (MoE statistics in expert chunks)
        and refuse, before any weight changes, a prune that will not fit (`PruningError`)."""

    def run(self, calibration: torch.Tensor | None, checkpoint=None) -> PruneReport:
        raise NotImplementedError
