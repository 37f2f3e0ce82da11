"""Evaluation of pruned models."""

from .perplexity import evaluation_windows, perplexity


__all__ = ["evaluation_windows", "perplexity"]
