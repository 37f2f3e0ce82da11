"""The depth engine: whole decoder layers removed by a method that ranks them (`removes_layers`).

One pass of the calibration windows through the dense model, a forward hook on every decoder
layer accumulating the cosine similarity of the hidden state it reads and the one it writes (per
token, in float64); the method turns one influence per layer (``1 - mean cosine``) into the layers
to remove within the budget, and `structure.shrink.remove_layers` deletes them (the rest renumbered
for the KV cache, ``num_hidden_layers`` / ``layer_types`` updated: a stock config).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..calibration.capture import first_output, run_windows
from ..configuration import PruningConfig
from ..errors import PruningError
from ..runtime.distributed import reduce_sums
from ..structure.layers import find_decoder_layers, matches
from ..structure.shrink import remove_layers
from .base import Engine
from .report import PruneReport


class DepthEngine(Engine):
    """Removes the decoder layers ``method.select_layers`` picks from their measured influence."""

    supports_processes = True

    def __init__(self, model: nn.Module, config: PruningConfig, method, device=None, progress: bool = True,
                 activations: str = "device", activation_folder=None):
        if config.overrides:
            raise PruningError(f"Method {method.name!r} removes whole decoder layers; per-module overrides do not "
                               f"apply. Use ignore=[...] to keep layers (e.g. 'model.layers.0').")
        self.model, self.config, self.method, self.progress = model, config, method, progress
        self.prefix, self.layers = find_decoder_layers(model)
        names = [f"{self.prefix}.{i}" for i in range(len(self.layers))]
        self.candidates = torch.tensor([(not config.targets or matches(n, config.targets))
                                        and not matches(n, config.ignore) for n in names])
        if not bool(self.candidates.any()):
            raise PruningError(f"No decoder layer ({self.prefix}.N) matches targets={config.targets} "
                               f"ignore={config.ignore}; nothing could be removed.")
        self.params = torch.tensor([sum(p.numel() for p in layer.parameters()) for layer in self.layers],
                                   dtype=torch.float64)

    @torch.no_grad()
    def influence(self, windows: torch.Tensor) -> torch.Tensor:
        """``1 - mean cos(x_in, x_out)`` of every decoder layer over the tokens of ``windows``."""
        sums = torch.zeros(len(self.layers), dtype=torch.float64)
        counts = torch.zeros(len(self.layers), dtype=torch.float64)

        def hook(index):
            def accumulate(module, args, kwargs, output):
                hidden = args[0] if args else kwargs["hidden_states"]
                cos = torch.nn.functional.cosine_similarity(hidden.double(), first_output(output).double(), dim=-1)
                sums[index] += float(cos.sum())
                counts[index] += cos.numel()
            return accumulate

        handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            run_windows(self.model, windows, self.config.batch_size, progress=self.progress)
        finally:
            for handle in handles:
                handle.remove()
        reduce_sums([sums, counts])  # several processes: the cosines of all their windows
        return 1.0 - sums / counts.clamp(min=1)

    def run(self, windows: torch.Tensor | None, checkpoint=None) -> PruneReport:
        if windows is None or windows.numel() == 0:
            raise PruningError(f"Method {self.method.name!r} needs calibration data; none was given.")
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            influence = self.influence(windows)
        finally:
            self.model.train(was_training)
        drop = self.method.select_layers(influence, self.params, self.config.sparsity * float(self.params.sum()),
                                         self.candidates)
        report = PruneReport(layer_influence=[float(v) for v in influence],
                             removed_layers=[int(i) for i in drop])
        for index, params in enumerate(self.params.tolist()):
            report.record(f"{self.prefix}.{index}", int(params) if index in report.removed_layers else 0, int(params))
        remove_layers(self.model, drop)
        report.seconds = time.perf_counter() - start
        return report
