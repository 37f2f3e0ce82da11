"""What both recoveries share: the checks of their settings and inputs, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..errors import PruningError, check_int, check_positive_int, check_positive_number
from ..runtime.offload import offload_hook


def check_training_settings(steps, lr, batch_size, seed, weight_decay) -> None:
    """One `PruningError` line for a bad step count, learning rate, batch size, seed or decay."""
    check_positive_int(steps, "recovery steps")
    check_positive_number(lr, "recovery lr")
    check_positive_int(batch_size, "recovery batch_size")
    check_int(seed, "recovery seed", 0)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise PruningError(f"recovery weight_decay must be a non-negative number, got {weight_decay!r}.")


def check_training_inputs(what: str, windows, *models) -> None:
    """Token windows to train on (n x seqlen, n >= 1), and ``models`` whose weights live in them
    (not in an accelerate offload store), or one `PruningError` line naming ``what`` trains."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise PruningError(f"{what} needs token windows (n x seqlen, n >= 1); give it calibration text.")
    if any(offload_hook(module) is not None for model in models for module in model.modules()):
        raise PruningError(f"{what} cannot train a model whose weights are offloaded to CPU/disk by accelerate; "
                           f"load it on one device (or several GPUs without offload).")


def warmup_cosine(step: int, steps: int, peak: float) -> float:
    """The learning rate of ``step`` (0-based) of ``steps``: linear warm-up over the first 10%,
    then cosine decay from ``peak`` to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
