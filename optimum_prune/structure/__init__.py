"""Where the prunable parts of a model are: decoder layers and the Linears inside them."""

from .layers import find_decoder_layers, select_target_linears


__all__ = ["find_decoder_layers", "select_target_linears"]
