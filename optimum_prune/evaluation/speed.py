"""Speed and size of a causal LM: prefill throughput, per-token decode latency, weight memory.

What a structured prune is for. Measured on whatever device the model is on, with the model's
own ``generate`` (KV cache) for decoding; CUDA timings are synchronised. Peak memory is the CUDA
allocator's peak on GPU; on CPU it is the process's peak RSS, so compare models each measured in
its own process (``benchmarks/speed.py`` does).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class SpeedReport:
    parameters: int
    weight_mb: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    peak_memory_mb: float
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, tied weights counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _median_seconds(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    batch_size: int = 1,
    prompt_length: int = 512,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> SpeedReport:
    """Median over ``repeats`` (after ``warmup`` runs) of:

    - prefill: one forward pass over ``batch_size x prompt_length`` tokens that returns the last
      position's logits only (what ``generate`` does before decoding), in tokens per second;
    - decode: after a prefill that fills the KV cache (not timed), ``new_tokens`` greedy steps of
      one token each through the cache (the loop ``generate`` runs), in milliseconds per token.
    """
    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_length), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(ids)

    def prefill():
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def decode_seconds() -> float:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, token, attention = out.past_key_values, out.logits[:, -1:].argmax(-1), mask
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            attention = torch.cat([attention, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=attention, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - start) / new_tokens

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        prefill()
        decode_seconds()
    prefill_s = _median_seconds(prefill, device, repeats)
    decode_s = statistics.median(decode_seconds() for _ in range(repeats))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return SpeedReport(
        parameters=sum(p.numel() for p in model.parameters()),
        weight_mb=weight_bytes(model) / 2**20,
        prefill_tokens_per_s=batch_size * prompt_length / prefill_s,
        decode_ms_per_token=decode_s * 1000.0,
        peak_memory_mb=peak,
        device=str(device),
    )
