"""What every engine offers the pruner: one interface, so that the pruner never asks which engine
it holds (`engine.build.build_engine` picks the engine a method needs)."""

from __future__ import annotations

import torch

from .report import PruneReport


class Engine:
    """Runs one prune of a model with a method, as a config describes."""

    #: whether the engine runs under torchrun / accelerate launch (windows sharded over processes)
    supports_processes: bool = False

    def prepare(self, windows: torch.Tensor | None) -> None:
        """Work on the dense model before any weight changes (a sparsity profile)."""

    def check_memory(self, num_windows: int, seqlen: int, input_device: torch.device, checkpoint: bool) -> None:
        """Refuse, before any weight changes, a prune that will not fit (`PruningError`)."""

    def run(self, calibration: torch.Tensor | None, checkpoint=None) -> PruneReport:
        raise NotImplementedError
