"""Handing freed host memory back to the operating system during whole-model passes.

glibc's ``malloc`` serves a large block from the heap, not from its own mapping, once a block of
that size has been freed (its mmap threshold rises to the largest freed block, up to 32 MiB); the
freed blocks then stay in the process as holes that later blocks of other sizes do not always fit.
A forward of SmolLM2-135M over 8 windows of 512 tokens through its 30 decoder layers, with a hook
on every Linear, first in its process, grew the peak memory by 1.0-1.7 GB of such holes where the tensors
alive at any moment needed about 0.15 GB (``benchmarks/profile_memory.py``). ``malloc_trim(0)``
after each decoder layer returns the free pages (the heap keeps its addresses): the same pass grew
it by 0.15-0.25 GB, and took 9.2 and 10.6 s against 8.1 and 8.9 s (docs/results/scaling.md).

Elsewhere than glibc (macOS, Windows, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager

from torch import nn


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
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
