"""Calibration: data windows, input statistics and the sequential layer engine."""

from .data import calibration_windows, load_calibration_source
from .engine import LayerwiseEngine
from .report import PruneReport
from .statistics import InputStatistics


__all__ = ["InputStatistics", "LayerwiseEngine", "PruneReport", "calibration_windows", "load_calibration_source"]
