"""Free host memory is handed back after each decoder layer of the profiles' whole-model passes,
and the hooks that do it leave with the pass."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model
from torch import nn

from optimum_prune.calibration import profiles
from optimum_prune.runtime import host_memory as allocator
from optimum_prune.structure import find_decoder_layers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_reaches_glibc():
    assert allocator.release_host_memory() is True


def test_releasing_after_runs_after_every_layer_forward_then_leaves(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "release_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: object())  # as on glibc, on any platform
    layers = [nn.Linear(4, 4) for _ in range(3)]
    x = torch.randn(2, 4)
    with allocator.releasing_after(layers):
        for layer in layers:
            x = layer(x)
        layers[0](x)
    assert len(calls) == 4
    for layer in layers:
        layer(x)
    assert len(calls) == 4 and not any(layer._forward_hooks for layer in layers)


def test_dense_input_norms_release_per_layer_and_match_a_plain_pass(monkeypatch):
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    layer_linears = [{f"{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
                     for i, layer in enumerate(layers)]
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    plain = profiles.dense_input_norms(model, layer_linears, windows, 2)
    calls = []
    monkeypatch.setattr(allocator, "release_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: object())
    released = profiles.dense_input_norms(model, layer_linears, windows, 2, layers)
    assert len(calls) == 2 * len(layers)  # two batches, every decoder layer
    assert plain.keys() == released.keys()
    assert all(torch.equal(plain[name], released[name]) for name in plain)
    assert not any(layer._forward_hooks for layer in layers)
