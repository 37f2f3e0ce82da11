"""`build_engine`: the engine a method needs, behind the one `Engine` interface."""

from __future__ import annotations

from .base import Engine


def build_engine(model, config, method, **options) -> Engine:
    """The engine for ``method``: whole layers removed for depth methods (block influence), the whole
    model at once for global methods (policy gradient), else layer by layer. ``options``: the engines' keyword arguments (device, progress, activations,
    activation_folder)."""
    if method.removes_layers:
        from .depth import DepthEngine

        return DepthEngine(model, config, method, **options)
    if method.is_global:
        from .global_search import GlobalStructuredEngine

        return GlobalStructuredEngine(model, config, method, **options)
    from .layerwise import LayerwiseEngine

    return LayerwiseEngine(model, config, method, **options)
