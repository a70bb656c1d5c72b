"""Data: datalists, MONAI transforms and the slice cache."""

from __future__ import annotations

from typing import Any

from .cache import CacheBuildError, SliceCache, SliceDataset
from .preprocessing import SLICE_TABLE_COLUMNS, SliceArrays, VolumePreprocessor
from .transforms import (
    BinarizeLabeld,
    BrainMaskd,
    CaseError,
    ForegroundPercentileNormalize,
    ForegroundPercentileNormalized,
    LoadCased,
    MinMaxScale,
    MinMaxScaled,
    SquarePad,
    SquarePadd,
)

# The datalist names are imported lazily (PEP 562) so that ``python -m anofpdm_monai.data.datalist`` does not find
# its own module already imported by this package (runpy's RuntimeWarning about unpredictable behaviour).
_DATALIST_NAMES = (
    "LAYOUTS",
    "SPLITS",
    "DatalistError",
    "build_datalist",
    "datalist_from_folder",
    "detect_layout",
    "load_datalist",
    "split_counts",
    "validate_datalist",
    "write_datalist",
)

__all__ = [
    *_DATALIST_NAMES,
    "CacheBuildError",
    "SliceCache",
    "SliceDataset",
    "SLICE_TABLE_COLUMNS",
    "SliceArrays",
    "VolumePreprocessor",
    "BinarizeLabeld",
    "BrainMaskd",
    "CaseError",
    "ForegroundPercentileNormalize",
    "ForegroundPercentileNormalized",
    "LoadCased",
    "MinMaxScale",
    "MinMaxScaled",
    "SquarePad",
    "SquarePadd",
]


def __getattr__(name: str) -> Any:
    if name in _DATALIST_NAMES:
        from . import datalist

        return getattr(datalist, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
