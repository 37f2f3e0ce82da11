"""Calibration: the data windows, the input statistics, the hooks that collect them and the
sparsity profiles measured on the dense model."""

from .data import calibration_windows, load_calibration_source
from .statistics import InputStatistics


__all__ = ["InputStatistics", "calibration_windows", "load_calibration_source"]
