"""Evaluation of pruned models: perplexity, zero-shot accuracy (lm-eval), speed and size."""

from .perplexity import evaluation_windows, perplexity
from .zero_shot import zero_shot


__all__ = ["evaluation_windows", "perplexity", "zero_shot"]
