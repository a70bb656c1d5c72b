"""Calibration of AnoFPDM from image-level labels: the algorithm, the record, and the engine pieces."""

from .algorithm import (
    DEFAULT_TAU_LEVELS,
    CalibrationStatistics,
    calibrate_from_statistics,
    select_guidance,
    select_tau,
)
from .engine import (
    CalibrationHandler,
    CalibrationInferer,
    StatisticsAccumulator,
    collect_statistics,
    make_calibration,
)
from .record import CALIBRATION_FORMAT, Calibration, CalibrationError

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationError",
    "CalibrationStatistics",
    "DEFAULT_TAU_LEVELS",
    "select_tau",
    "select_guidance",
    "calibrate_from_statistics",
    "CalibrationInferer",
    "CalibrationHandler",
    "StatisticsAccumulator",
    "collect_statistics",
    "make_calibration",
]
