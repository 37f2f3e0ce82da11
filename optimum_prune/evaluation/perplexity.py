"""Perplexity over non-overlapping windows of a token stream (the protocol of shared/EVAL.md)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..assets import PACKAGED_PREFIX
from ..calibration.data import load_calibration_source, tokenize_joined
from ..errors import PruningError
from ..paths import looks_local


def evaluation_windows(data, tokenizer, seqlen: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize the joined text once (no BOS) and cut it into consecutive ``seqlen`` windows."""
    if isinstance(data, str) and not (data.startswith(PACKAGED_PREFIX) or os.path.isfile(data)
                                      or looks_local(data, suffixes=(".txt", ".json", ".jsonl"))):
        source = [data]  # raw text
    else:
        source = load_calibration_source(data, what="The evaluation text")
    ids = source if isinstance(source, torch.Tensor) else tokenize_joined(source, tokenizer, max_chars=None)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise PruningError(f"The evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    data,
    seqlen: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over all predicted tokens of up to ``max_windows`` windows.

    ``data``: raw text, a list of strings (joined with a blank line), token ids, a ``datasets.Dataset``,
    a local .txt/.json/.jsonl file or ``packaged:wiki-leads-eval``.
    """
    windows = evaluation_windows(data, tokenizer, seqlen, max_windows)
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
