"""Handing freed host memory back to the operating system: after each layer the engine prunes,
and after each decoder layer of the profiles' whole-model passes.

The engine's layers: the per-forward weight copies of offloaded layers and the solvers'
temporaries are freed blocks of a few MB that glibc otherwise keeps in its heap, so the process
grew with every layer (+20 MB per SmolLM2 layer with disk offload; flat with the trim).

The whole-model passes: glibc's ``malloc`` serves a large block from the heap, not from its own
mapping, once a block of that size has been freed (its mmap threshold rises to the largest freed
block, up to 32 MiB); the freed blocks then stay in the process as holes that later blocks of other
sizes do not always fit. A forward of SmolLM2-135M over 8 windows of 512 tokens through its 30
decoder layers, with a hook on every Linear, first in its process, grew the peak memory by 1.0-1.7
GB of such holes where the tensors alive at any moment needed about 0.15 GB
(``benchmarks/profile_memory.py``). ``malloc_trim(0)`` after each decoder layer returns the free
pages (the heap keeps its addresses): the same pass grew it by 0.15-0.27 GB, at some cost in time
(9.2-11.4 s against 7.0-9.4 s on two cores; docs/results/scaling.md).

Elsewhere than glibc (macOS, Windows, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from contextlib import contextmanager

from torch import nn


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others lack it
        return None


def release_host_memory() -> bool:
    """Return the C heap's free pages to the operating system; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextmanager
def releasing_after(modules: list[nn.Module]):
    """While the block runs, free host pages are returned after each forward of each of ``modules``
    (the decoder layers of a whole-model pass)."""
    if _malloc_trim() is None:
        yield
        return
    hooks = [module.register_forward_hook(_release) for module in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _release(module, args, output):
    release_host_memory()
